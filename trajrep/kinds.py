"""The probe kinds, one registry entry each: what the probe module, the presets and the report need to know about a
kind. A new head is one `register` call with its class; nothing else names it.

Order matters: the results table lists the kinds in registry order.
"""

from dataclasses import dataclass

from trajrep.errors import TrajrepError
from trajrep.nn.probes import (ConcatHead, ContinuousTransformerHead, GRUHead, LinearHead, MeanHead, MLPHead,
                               ProbeHead, SingleTimeHead, TransformerHead, WeightedHead)


@dataclass(frozen=True)
class Kind:
    """A probe kind. `head` is its class (None for kNN, which trains nothing and runs as its own module); `column`
    is its label in the results table; `config` the file under configs/probe/ a preset starts its stage from.
    A `mixer` is learned over every t: its gradients are clipped at 1 (method §7) and the table reports its
    difference to the best single t. `attention`: the head returns attention over t, which the probe exports and
    the masking ablation reads. `cpu_chunk`: members trained per chunk on a CPU (None: the whole grid at once)."""

    head: type[ProbeHead] | None
    column: str
    config: str
    mixer: bool = False
    attention: bool = False
    cpu_chunk: int | None = None

    @property
    def single_time(self) -> bool:
        """Whether every t of the grid gets its own probes (the t is then chosen on validation)."""
        return self.head is None or issubclass(self.head, SingleTimeHead)


KINDS: dict[str, Kind] = {}


def register(name: str, kind: Kind) -> None:
    """Add (or replace) the kind `name`."""
    KINDS[name] = kind


def kind_of(name: str) -> Kind:
    """The registered kind `name`; an unknown one is a clear error."""
    if name not in KINDS:
        raise TrajrepError(f"unknown probe kind {name!r}; valid kinds: {', '.join(sorted(KINDS))}")
    return KINDS[name]


def head_kinds() -> list[str]:
    """The kinds that train a head (every kind but kNN)."""
    return [name for name, kind in KINDS.items() if kind.head is not None]


def single_time_kinds() -> list[str]:
    """The probes of one representation at each t (which the raw-pixel control also gets)."""
    return [name for name, kind in KINDS.items() if kind.single_time]


def build_head(name: str, **kwargs) -> ProbeHead:
    """The head of kind `name`, built with `kwargs`."""
    head = kind_of(name).head
    if head is None:
        raise TrajrepError(f"the {name} probe trains no head; run it with its own config (configs/probe/{name}.yaml)")
    return head(**kwargs)


# Members per chunk, the fastest on a 2-core CPU (fewer, larger kernels vs activations that stay in cache):
# `python benchmarks/probe_grid.py --chunks` measures them.
register("mlp", Kind(MLPHead, "best single t", "mlp", cpu_chunk=16))
register("linear", Kind(LinearHead, "linear, best t", "linear"))
register("knn", Kind(None, "kNN, best t", "knn"))
register("concat", Kind(ConcatHead, "concat", "concat", cpu_chunk=16))
register("mean", Kind(MeanHead, "mean", "mean", cpu_chunk=16))
register("weighted", Kind(WeightedHead, "weighted", "weighted", cpu_chunk=16))
register("gru", Kind(GRUHead, "GRU", "gru", mixer=True, cpu_chunk=6))
register("transformer", Kind(TransformerHead, "Transformer", "transformer", mixer=True, attention=True, cpu_chunk=3))
register("continuous", Kind(ContinuousTransformerHead, "continuous", "continuous", mixer=True, attention=True,
                            cpu_chunk=3))
