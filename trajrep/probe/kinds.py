"""The probe kinds, one registry entry each: what the probe module, the presets and the report need to know about a
kind. A new head is one `register` call with its class; nothing else names it. A probe is given its head's options
(the head's `Options` dataclass, trajrep.nn.probes), and its kind is the one whose head takes them.

Order matters: the results table lists the kinds in registry order. The built-in heads are named by import path,
so that reading the registry (the report does) imports no model.
"""

import importlib
from dataclasses import dataclass

from trajrep.errors import TrajrepError


@dataclass(frozen=True)
class Kind:
    """A probe kind. `head` is its class, or its "module:Class" path (None for kNN, which trains nothing and runs
    as its own module); `column` is its label in the results table; `config` the file under configs/probe/ a
    preset starts its stage from. `single_time`: every t of the grid gets its own probes, and the t is chosen on
    validation (the head is a SingleTimeHead). A `mixer` is learned over every t: its gradients are clipped at 1
    (method §7) and the table reports its difference to the best single t. `attention`: the head returns attention
    over t: the probe exports it and runs the masking ablation (the report and the analyses read the
    Transformer's). `cpu_chunk`: members trained per chunk on a
    CPU (None: the whole grid at once)."""

    head: type | str | None
    column: str
    config: str
    single_time: bool = False
    mixer: bool = False
    attention: bool = False
    cpu_chunk: int | None = None

    def head_class(self) -> type | None:
        """The head's class, imported when named by path."""
        if not isinstance(self.head, str):
            return self.head
        module, name = self.head.split(":")
        return getattr(importlib.import_module(module), name)

    def options_class(self) -> type:
        """The head's options dataclass, its `Options`; a head that names none is a clear error."""
        head = self.head_class()
        options = getattr(head, "Options", None)
        if options is None:
            raise TrajrepError(f"the head {head.__name__} names no options class: give it `Options = MyOptions`, a "
                               "frozen dataclass subclassing trajrep.nn.probes.HeadOptions")
        return options

    def options_path(self) -> str:
        """The class path of the head's options, as the CLI takes it (`--model.head=<path>`)."""
        options = self.options_class()
        return f"{options.__module__}.{options.__qualname__}"


KINDS: dict[str, Kind] = {}


def register(name: str, kind: Kind) -> None:
    """Add (or replace) the kind `name`. A head given as a class must name its options class."""
    if isinstance(kind.head, type):
        kind.options_class()
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


def kind_of_options(options: object) -> str:
    """The kind whose head takes `options` (an instance of its `Options`); none, or several (heads that share an
    options class), is a clear error."""
    found = [name for name in head_kinds() if KINDS[name].options_class() is type(options)]
    if len(found) != 1:
        problem = "no probe kind takes" if not found else f"the kinds {', '.join(found)} all take"
        known = ", ".join(KINDS[name].options_class().__name__ for name in head_kinds())
        raise TrajrepError(f"{problem} head options {type(options).__name__}; the kinds' options: {known} (a "
                           "registered head needs an options class of its own)")
    return found[0]


def options_from_config(config: dict) -> object:
    """Head options from the form a config, a probe's hyperparameters and its result records hold them in:
    {"class_path": ..., "init_args": {...}}."""
    module, _, name = config["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**config.get("init_args", {}))


def head_class_of(name: str) -> type:
    """The head class of kind `name`; a kind that trains no head (kNN) is a clear error."""
    head = kind_of(name).head_class()
    if head is None:
        raise TrajrepError(f"the {name} probe trains no head; run it with its own config (configs/probe/{name}.yaml)")
    return head


def default_options(name: str) -> object:
    """The head options of kind `name` at their defaults."""
    head_class_of(name)  # kNN trains no head: a clear error
    return kind_of(name).options_class()()


def build_head(name: str, options: object, **sizes):
    """The head of kind `name` (a trajrep.nn.probes.ProbeHead) with its `options` and the module's `sizes`."""
    return head_class_of(name)(**sizes, options=options)


# Members per chunk, the fastest on a 2-core CPU (fewer, larger kernels vs activations that stay in cache):
# `python benchmarks/probe_grid.py --chunks` measures them. The Transformer's matmuls ran fastest with 2 members
# per batched matmul (328 GFLOP/s against 294 for one, 243 for 3 and about 205 for 4 or more; benchmarks/RESULTS.md).
HEADS = "trajrep.nn.probes"
register("mlp", Kind(f"{HEADS}:MLPHead", "best single t", "mlp", single_time=True, cpu_chunk=16))
register("linear", Kind(f"{HEADS}:LinearHead", "linear, best t", "linear", single_time=True))
register("knn", Kind(None, "kNN, best t", "knn", single_time=True))
register("concat", Kind(f"{HEADS}:ConcatHead", "concat", "concat", cpu_chunk=16))
register("mean", Kind(f"{HEADS}:MeanHead", "mean", "mean", cpu_chunk=16))
register("weighted", Kind(f"{HEADS}:WeightedHead", "weighted", "weighted", cpu_chunk=16))
register("gru", Kind(f"{HEADS}:GRUHead", "GRU", "gru", mixer=True, cpu_chunk=6))
register("transformer", Kind(f"{HEADS}:TransformerHead", "Transformer", "transformer", mixer=True, attention=True,
                             cpu_chunk=2))
register("continuous", Kind(f"{HEADS}:ContinuousTransformerHead", "continuous", "continuous", mixer=True,
                            attention=True, cpu_chunk=2))
