"""Probe heads (method §7) over cached representations, each a grid of G members trained as one module.

Every head maps x of shape (G, B, T, d) - member g's own batch over the T cached times - to logits
(G, B, sum(num_classes)); a (B, T, d) batch is shared by all members (evaluation). Member g is initialised from
`seeds[g]` alone, so the grid (lr x seed, or lr x seed x t for the per-t MLP) is G independent probes.
Train with `member_losses(...).sum()`, `clip_grad_norm_per_member_` and `GroupedAdam`. trajrep.probe.kinds registers
each head as a probe kind.

A head's own options (widths, dropout) are a frozen dataclass, its `Options`: the type of ProbeModule's `head`, so
that the CLI shows them with their defaults (`--print_config`) and refuses a misspelled one by name, and the kind
of a probe follows from the options it is given.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trajrep.diffusion import VESDE
from trajrep.errors import TrajrepError
from trajrep.nn.embedding import GaussianFourierFeatures
from trajrep.nn.grouped import (GroupedGRUCell, GroupedLinear, GroupedMLP, GroupedTransformerBlock, dropout,
                                grouped_clip_grad_norm_, member_generators)


def member_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """Each member's batch-mean cross-entropy, (G,), from logits (G, B, C) and labels (G, B). Backpropagate their
    SUM: every member then keeps its own gradient. The classes go in the middle, (G, C, B): torch's log-softmax over
    a few classes then runs along the batch, 4-5x faster on a CPU than over rows of 10 (`benchmarks/RESULTS.md`)."""
    return F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(1)


def clip_grad_norm_per_member_(module: "ProbeHead", max_norm: float) -> Tensor:
    """Clip each member's gradient to `max_norm` over all its parameter slices; returns the (G,) norms."""
    return grouped_clip_grad_norm_(module.parameters(), max_norm, module.num_members)


def random_time_subset(num_times: int, size: int | None = None,
                       generator: torch.Generator | None = None) -> Tensor:
    """Sorted indices of a random subset of the cached times (size uniform in 1..num_times unless given).

    For training the continuous head on varying time sets; all members share the subset of a batch.
    """
    if size is None:
        size = int(torch.randint(1, num_times + 1, (), generator=generator))
    if not 1 <= size <= num_times:
        raise ValueError(f"subset size must be in 1..{num_times}, got {size}")
    return torch.randperm(num_times, generator=generator)[:size].sort().values


def sinusoidal_encoding(length: int, dim: int) -> Tensor:
    """Standard sin/cos positional code by sequence index: (length, dim)."""
    position = torch.arange(length, dtype=torch.float64).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    code = torch.zeros(length, dim, dtype=torch.float64)
    code[:, 0::2] = torch.sin(position * frequency)
    code[:, 1::2] = torch.cos(position * frequency)[:, : dim // 2]
    return code.to(torch.get_default_dtype())


class HeadOptions:
    """Base of the heads' option dataclasses (not one itself: the CLI then takes a subclass by class path,
    `--model.head=TransformerOptions`, and its fields as `--model.head.d_model=64`)."""


@dataclass(frozen=True)
class MLPOptions(HeadOptions):
    """The MLP's options.

    Args:
        hidden_dim: width of its hidden layer.
        dropout: dropout on the hidden layer.
    """

    hidden_dim: int = 512
    dropout: float = 0.25


@dataclass(frozen=True)
class LinearOptions(HeadOptions):
    """The linear probe has no options."""


@dataclass(frozen=True)
class ConcatOptions(MLPOptions):
    """The MLP's options, for the MLP on all t concatenated."""


@dataclass(frozen=True)
class MeanOptions(MLPOptions):
    """The MLP's options, for the MLP on the mean over t."""


@dataclass(frozen=True)
class WeightedOptions(MLPOptions):
    """The MLP's options, for the MLP on a learned weighted sum over t."""


@dataclass(frozen=True)
class GRUOptions(HeadOptions):
    """The GRU's options.

    Args:
        hidden_dim: width of its hidden state.
        dropout: dropout on the hidden state after every step (the dropped state is fed back).
    """

    hidden_dim: int = 256
    dropout: float = 0.25


@dataclass(frozen=True)
class TransformerOptions(HeadOptions):
    """The Transformer's options.

    Args:
        d_model: width of the tokens.
        num_heads: attention heads.
        ffn_dim: width of the feed-forward layer.
        num_applications: how many times the one block (shared weights) is applied.
        dropout: dropout on the tokens, the attention and the feed-forward layer.
    """

    d_model: int = 256
    num_heads: int = 4
    ffn_dim: int = 512
    num_applications: int = 2
    dropout: float = 0.25


@dataclass(frozen=True)
class ContinuousOptions(TransformerOptions):
    """The Transformer's options, and those of the time code.

    Args:
        sigma_min: smallest noise scale of sigma(t); None: the one of the cache the probe reads (VESDE's default
            for data that names none).
        sigma_max: largest noise scale of sigma(t); None: the one of the cache the probe reads (VESDE's default
            for data that names none).
        num_frequencies: Fourier frequencies of the time code.
        fourier_scale: scale of the Fourier frequencies.
        fourier_seed: seed of the Fourier frequencies (shared by all members).
    """

    sigma_min: float | None = None
    sigma_max: float | None = None
    num_frequencies: int = 16
    fourier_scale: float = 1.0
    fourier_seed: int = 0


class ProbeHead(nn.Module):
    """Common arguments and input handling of the heads: (G, B, T, d) [+ t (T,)] -> logits (G, B, C_total).
    A subclass names its options dataclass as `Options` and takes an instance of it after the seeds."""

    Options: type[HeadOptions]

    def __init__(self, num_members: int, feature_dim: int, num_times: int, num_classes: Sequence[int],
                 seeds: Sequence[int]) -> None:
        super().__init__()
        if len(seeds) != num_members:
            raise TrajrepError(f"need one seed per probe member: num_members={num_members}, got {len(seeds)} seeds")
        if not num_classes or min(num_classes) < 1:
            raise TrajrepError(f"num_classes must list at least one task with >= 1 class, got {list(num_classes)}")
        self.num_members, self.feature_dim, self.num_times = num_members, feature_dim, num_times
        self.num_classes, self.seeds = [int(c) for c in num_classes], [int(s) for s in seeds]

    @property
    def total_classes(self) -> int:
        return sum(self.num_classes)

    def select_inputs(self, x: Tensor, member_rows: Tensor) -> Tensor:
        """Training inputs (G, B, T, d) from per-seed batches (S, B, T, d): member g reads row member_rows[g]."""
        return x[member_rows]

    def member_batches(self, x: Tensor, fixed_times: bool = True) -> Tensor:
        """Check x and give it the member dim: a shared (B, T, d) batch is broadcast to every member."""
        if x.dim() == 3:
            x = x.unsqueeze(0).expand(self.num_members, *x.shape)
        if x.dim() != 4 or x.shape[0] != self.num_members or x.shape[-1] != self.feature_dim:
            raise ValueError(f"expected representations (G={self.num_members}, B, T, d={self.feature_dim}) "
                             f"or (B, T, d), got {tuple(x.shape)}")
        if fixed_times and x.shape[2] != self.num_times:
            raise TrajrepError(f"{type(self).__name__} was built for {self.num_times} times but got "
                               f"{x.shape[2]}; rebuild it for this time grid")
        return x


class SingleTimeHead(ProbeHead):
    """A classifier on ONE time per member: member g reads time_index[g]. The per-t grid puts the time index into
    the members (11 t x 30 lr-seed pairs = 330 members); without time_index every member reads the only time
    (num_times must be 1). Subclasses define `classify` on (G, B, d)."""

    def __init__(self, num_members: int, feature_dim: int, num_times: int, num_classes: Sequence[int],
                 seeds: Sequence[int], time_index: Sequence[int] | None) -> None:
        super().__init__(num_members, feature_dim, num_times, num_classes, seeds)
        if time_index is None:
            if num_times != 1:
                raise TrajrepError(f"the {type(self).__name__} over {num_times} times needs time_index (one time "
                                   "per member)")
            time_index = [0] * num_members
        if len(time_index) != num_members or not all(0 <= i < num_times for i in time_index):
            raise TrajrepError(f"time_index needs {num_members} entries in 0..{num_times - 1}, got {list(time_index)}")
        self.register_buffer("time_index", torch.as_tensor(time_index, dtype=torch.long), persistent=False)

    def classify(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def select_inputs(self, x: Tensor, member_rows: Tensor) -> Tensor:
        """Member g's batch at its own time only: (G, B, 1, d) from per-seed batches (S, B, T, d)."""
        batch = torch.arange(x.shape[1], device=x.device)
        return x[member_rows[:, None], batch[None, :], self.time_index[:, None]].unsqueeze(2)

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        """x is (G, B, T, d) or shared (B, T, d); a time dim of 1 means `select_inputs` already chose the time."""
        if x.dim() == 4 and x.shape[2] == 1:
            return self.classify(x.squeeze(2))
        x = self.member_batches(x)
        index = self.time_index.view(-1, 1, 1, 1).expand(-1, x.shape[1], 1, x.shape[3])
        return self.classify(x.gather(2, index).squeeze(2))


class MLPHead(SingleTimeHead):
    """Linear(d, 512) -> ReLU -> Dropout -> Linear(512, C) on one time per member (method §7)."""

    Options = MLPOptions

    def __init__(self, num_members: int, feature_dim: int, num_times: int, num_classes: Sequence[int],
                 seeds: Sequence[int], options: MLPOptions = MLPOptions(), *,
                 time_index: Sequence[int] | None = None) -> None:
        super().__init__(num_members, feature_dim, num_times, num_classes, seeds, time_index)
        self.mlp = GroupedMLP(num_members, feature_dim, options.hidden_dim, self.total_classes, options.dropout,
                              member_generators(self.seeds))

    def classify(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class LinearHead(SingleTimeHead):
    """The linear probe of the self-supervised field: one Linear(d, C) on one time per member."""

    Options = LinearOptions

    def __init__(self, num_members: int, feature_dim: int, num_times: int, num_classes: Sequence[int],
                 seeds: Sequence[int], options: LinearOptions = LinearOptions(), *,
                 time_index: Sequence[int] | None = None) -> None:
        super().__init__(num_members, feature_dim, num_times, num_classes, seeds, time_index)
        self.linear = GroupedLinear(num_members, feature_dim, self.total_classes, member_generators(self.seeds))

    def classify(self, x: Tensor) -> Tensor:
        return self.linear(x)


class ConcatHead(ProbeHead):
    """Baseline: the MLP on all T representations concatenated (input d * T)."""

    Options = ConcatOptions

    def __init__(self, num_members: int, feature_dim: int, num_times: int, num_classes: Sequence[int],
                 seeds: Sequence[int], options: ConcatOptions = ConcatOptions()) -> None:
        super().__init__(num_members, feature_dim, num_times, num_classes, seeds)
        self.mlp = GroupedMLP(num_members, feature_dim * num_times, options.hidden_dim, self.total_classes,
                              options.dropout, member_generators(self.seeds))

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        return self.mlp(self.member_batches(x).flatten(2))


class MeanHead(ProbeHead):
    """Baseline: the MLP on the mean representation over t."""

    Options = MeanOptions

    def __init__(self, num_members: int, feature_dim: int, num_times: int, num_classes: Sequence[int],
                 seeds: Sequence[int], options: MeanOptions = MeanOptions()) -> None:
        super().__init__(num_members, feature_dim, num_times, num_classes, seeds)
        self.mlp = GroupedMLP(num_members, feature_dim, options.hidden_dim, self.total_classes, options.dropout,
                              member_generators(self.seeds))

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        return self.mlp(self.member_batches(x).mean(dim=2))


class WeightedHead(ProbeHead):
    """Baseline: learned softmax weights over the T times (per member, start uniform), weighted sum, then the MLP."""

    Options = WeightedOptions

    def __init__(self, num_members: int, feature_dim: int, num_times: int, num_classes: Sequence[int],
                 seeds: Sequence[int], options: WeightedOptions = WeightedOptions()) -> None:
        super().__init__(num_members, feature_dim, num_times, num_classes, seeds)
        self.time_logits = nn.Parameter(torch.zeros(num_members, num_times))
        self.mlp = GroupedMLP(num_members, feature_dim, options.hidden_dim, self.total_classes, options.dropout,
                              member_generators(self.seeds))

    def time_weights(self) -> Tensor:
        """(G, T) weights over time; what the probe learned to look at."""
        return self.time_logits.softmax(dim=-1)

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        return self.mlp(torch.einsum("gt,gbtd->gbd", self.time_weights(), self.member_batches(x)))


class GRUHead(ProbeHead):
    """GRUCell(d, 256) over the times in cache order (increasing t), h0 = 0, dropout on h after every step
    (the dropped h is fed back), Linear(256, C) on the last h."""

    Options = GRUOptions

    def __init__(self, num_members: int, feature_dim: int, num_times: int, num_classes: Sequence[int],
                 seeds: Sequence[int], options: GRUOptions = GRUOptions()) -> None:
        super().__init__(num_members, feature_dim, num_times, num_classes, seeds)
        generators = member_generators(self.seeds)
        self.cell = GroupedGRUCell(num_members, feature_dim, options.hidden_dim, generators)
        self.classifier = GroupedLinear(num_members, options.hidden_dim, self.total_classes, generators)
        self.dropout = options.dropout

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        h = self.cell.run(self.cell.project_input(self.member_batches(x)), self.dropout, self.training)
        return self.classifier(h)


class _TokenMixerHead(ProbeHead):
    """Shared body of the attention heads: tokens = Dropout(Linear(d, D)(x_t)) + position code, a learned CLS
    token appended LAST (no position code), ONE post-norm block applied `num_applications` times with shared
    weights, Linear(D, C) on the CLS output. Subclasses say what the position code is; `generators` (one per
    member, from the seeds) are passed in so that a subclass can draw its own parameters after these."""

    def __init__(self, num_members: int, feature_dim: int, num_times: int, num_classes: Sequence[int],
                 seeds: Sequence[int], options: TransformerOptions, generators: Sequence[torch.Generator]) -> None:
        super().__init__(num_members, feature_dim, num_times, num_classes, seeds)
        d_model = options.d_model
        self.token_proj = GroupedLinear(num_members, feature_dim, d_model, generators)
        self.block = GroupedTransformerBlock(num_members, d_model, options.num_heads, options.ffn_dim, options.dropout,
                                             generators)
        bound = math.sqrt(6.0 / (2 * d_model))  # xavier-uniform of a (1, 1, D) token, as the original code
        self.cls = nn.Parameter(torch.stack([torch.empty(d_model).uniform_(-bound, bound, generator=generator)
                                             for generator in generators]))
        self.classifier = GroupedLinear(num_members, d_model, self.total_classes, generators)
        self.num_applications, self.dropout = options.num_applications, options.dropout

    def position_code(self, num_tokens: int, t: Tensor | None) -> Tensor:
        """Code added to the time tokens, broadcastable to (G, B, T, D)."""
        raise NotImplementedError

    def forward(self, x: Tensor, t: Tensor | None = None, *, return_attention: bool = False,
                key_mask: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Logits (G, B, C); with return_attention also the CLS query's attention over the T + 1 keys
        (time tokens in order, CLS last), averaged over heads, from the LAST application of the block.

        key_mask (bool, True = masked) of shape (T + 1,), (B, T + 1) or (G, B, T + 1) hides chosen time tokens or
        the CLS key (index T) in every application.
        """
        x = self.member_batches(x, fixed_times=False)
        tokens = dropout(self.token_proj(x), self.dropout, self.training) + self.position_code(x.shape[2], t)
        cls = self.cls[:, None, None, :].expand(-1, x.shape[1], 1, -1)
        h, weights = torch.cat([tokens, cls.to(tokens.dtype)], dim=2), None
        for application in range(self.num_applications):
            last = application == self.num_applications - 1
            h, weights = self.block(h, key_mask, need_weights=return_attention and last)
        logits = self.classifier(h[:, :, -1])
        return (logits, weights[:, :, -1]) if return_attention else logits


class TransformerHead(_TokenMixerHead):
    """Transformer mixer of method §7: the position code is the fixed sinusoidal code of the sequence index."""

    Options = TransformerOptions

    def __init__(self, num_members: int, feature_dim: int, num_times: int, num_classes: Sequence[int],
                 seeds: Sequence[int], options: TransformerOptions = TransformerOptions()) -> None:
        super().__init__(num_members, feature_dim, num_times, num_classes, seeds, options, member_generators(seeds))
        self.register_buffer("index_code", sinusoidal_encoding(num_times, options.d_model), persistent=False)

    def position_code(self, num_tokens: int, t: Tensor | None) -> Tensor:
        if num_tokens != self.num_times:
            raise TrajrepError(f"the transformer head was built for {self.num_times} times but got {num_tokens}; "
                               "index positions only mean something on the grid it was built for "
                               "(the continuous head takes any time set)")
        return self.index_code


class ContinuousTransformerHead(_TokenMixerHead):
    """Transformer mixer whose position code is a function of the actual t: a per-member Linear of Gaussian
    Fourier features of log sigma(t). It has no index positions, so it runs on any set of times.

    The Fourier frequencies are a fixed feature map shared by all members, drawn from `fourier_seed`. Their
    default scale is 1 (not the 16 of the encoder's time embedding): log sigma spans about 8.5 over t in [0, 1],
    and scale 16 would make neighbouring grid times look unrelated, defeating interpolation to unseen t.
    `sigma_min` and `sigma_max` give the noise process of sigma(t); ProbeModule sets those left at None from the
    cache it reads.
    """

    Options = ContinuousOptions

    def __init__(self, num_members: int, feature_dim: int, num_times: int, num_classes: Sequence[int],
                 seeds: Sequence[int], options: ContinuousOptions = ContinuousOptions()) -> None:
        generators = member_generators(seeds)
        super().__init__(num_members, feature_dim, num_times, num_classes, seeds, options, generators)
        given = {"sigma_min": options.sigma_min, "sigma_max": options.sigma_max}
        self.sde = VESDE(**{key: value for key, value in given.items() if value is not None})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(options.fourier_seed)
            self.fourier = GaussianFourierFeatures(options.num_frequencies, options.fourier_scale)
        self.time_proj = GroupedLinear(num_members, self.fourier.out_dim, options.d_model, generators)

    def position_code(self, num_tokens: int, t: Tensor | None) -> Tensor:
        if t is None or t.shape != (num_tokens,):
            raise ValueError(f"the continuous head needs the time values t of shape ({num_tokens},), got "
                             f"{None if t is None else tuple(t.shape)}")
        features = self.fourier(self.sde.log_sigma(t.to(self.fourier.frequencies)))
        return self.time_proj(features.expand(self.num_members, -1, -1)).unsqueeze(1)
