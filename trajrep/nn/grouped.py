"""Grouped (stacked-weight) building blocks: G independent small models trained as one module.

A probe grid (lr x seed, or one MLP per t) is overhead-bound when its members train one by one. Here every
parameter carries a leading member dimension G and the forward pass uses batched matmuls, so the whole grid is
one module. Inputs are shaped (G, B, ...): member g sees its own batch. Members never mix: the loss to
backpropagate is the SUM of the per-member losses, so member g's gradient is exactly what it would be alone.

Initialisation draws member g's parameters from its own generator (`member_generators(seeds)`), in the same
order and shapes as the matching torch module, so a member's init depends on its seed only, not on G.
`GroupedAdam` and `grouped_clip_grad_norm_` make per-member learning rates and per-member gradient clipping
exact (Lightning's `gradient_clip_val` would clip all members together).
"""

import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Generators = Sequence[torch.Generator] | None


def member_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per member; drawing from generator g equals drawing after `torch.manual_seed(seeds[g])`."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


def _generator(generators: Generators, g: int) -> torch.Generator | None:
    return None if generators is None else generators[g]


def _check_generators(num_members: int, generators: Generators) -> None:
    if generators is not None and len(generators) != num_members:
        raise ValueError(f"need one generator per member: {num_members} members, {len(generators)} generators")


def member_view(values: Tensor, like: Tensor) -> Tensor:
    """Reshape a (G,) tensor so that it broadcasts over a (G, ...) tensor."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def _flatten_members(x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """(G, ..., in) -> (G, N, in) for one batched matmul, plus the middle shape to restore."""
    return x.reshape(x.shape[0], -1, x.shape[-1]), tuple(x.shape[1:-1])


def dropout_keep_mask(like: Tensor, p: float) -> Tensor:
    """A Bernoulli(1 - p) keep mask of 0s and 1s, shaped like `like` and of its dtype, cut from raw random bits: 8
    bits an element, or 16 (p then rounded to a multiple of 2^-16) where p is not a multiple of 1/256.

    Why: torch draws dropout masks with `bernoulli_`, about 10 ns an element on a CPU, which dominated the grids'
    training steps (330 MLPs x 256 examples x 512 units a step); 64-bit words cut into bytes cost about 1 ns. The
    bits become 0/1 by integer clamps (a comparison would give a bool tensor, and torch's CPU kernels that read
    bools run several times slower than those on numbers).
    """
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    bits = 8 if float(p * 256).is_integer() else 16
    dtype, lowest = (torch.uint8, 0) if bits == 8 else (torch.int16, -2 ** 15)
    words = torch.empty(-(-like.numel() * bits // 64), dtype=torch.int64, device=like.device)
    values = words.random_(-2 ** 63, None).view(dtype)[: like.numel()].view(like.shape)  # full 64-bit range
    threshold = lowest + round(p * 2 ** bits)  # keep the values >= threshold
    if threshold == lowest or threshold >= lowest + 2 ** bits:  # p rounded to 0 or to 1; the bits were drawn
        return torch.full_like(like, float(threshold == lowest))  # anyway, so the random stream stays aligned
    return values.clamp_(threshold - 1, threshold).sub_(threshold - 1).to(like.dtype)


def scaled_keep_mask(like: Tensor, p: float) -> Tensor:
    """`dropout_keep_mask` times inverted dropout's 1 / (1 - p): one multiply forward, one backward."""
    return dropout_keep_mask(like, p).mul_(1 / (1 - p))


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout, as F.dropout, with the mask from `dropout_keep_mask`."""
    if not training or p == 0:
        return x
    with torch.no_grad():
        scaled_keep = scaled_keep_mask(x, p)
    return x * scaled_keep


def linear_init(in_features: int, out_features: int,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """nn.Linear's init (kaiming-uniform a=sqrt(5), bias +-1/sqrt(in)) in its draw order, from `generator`."""
    weight = torch.empty(out_features, in_features)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    bound = 1 / math.sqrt(in_features) if in_features > 0 else 0.0
    return weight, torch.empty(out_features).uniform_(-bound, bound, generator=generator)


class GroupedLinear(nn.Module):
    """G independent nn.Linear layers: weight (G, in, out), bias (G, out); (G, ..., in) -> (G, ..., out)."""

    def __init__(self, num_members: int, in_features: int, out_features: int,
                 generators: Generators = None) -> None:
        super().__init__()
        _check_generators(num_members, generators)
        self.num_members, self.in_features, self.out_features = num_members, in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_members, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(num_members, out_features))
        with torch.no_grad():
            for g in range(num_members):
                weight, bias = linear_init(in_features, out_features, _generator(generators, g))
                self.weight[g].copy_(weight.T)
                self.bias[g].copy_(bias)

    def forward(self, x: Tensor) -> Tensor:
        flat, middle = _flatten_members(x)
        out = torch.baddbmm(self.bias.unsqueeze(1), flat, self.weight)
        return out.view(self.num_members, *middle, self.out_features)

    @torch.no_grad()
    def load_linear(self, g: int, linear: nn.Linear) -> None:
        """Overwrite member g with the weights of a plain nn.Linear."""
        self.weight[g].copy_(linear.weight.T)
        self.bias[g].copy_(linear.bias)

    @torch.no_grad()
    def to_linear(self, g: int) -> nn.Linear:
        """Member g as a plain nn.Linear (a copy), on the same device and dtype."""
        linear = nn.Linear(self.in_features, self.out_features, device=self.weight.device, dtype=self.weight.dtype)
        linear.weight.copy_(self.weight[g].T)
        linear.bias.copy_(self.bias[g])
        return linear


def _apply_as_autocast_would(function: type[torch.autograd.Function], tensors: Sequence[Tensor], *options):
    """Run a hand-written autograd Function as autocast runs matmuls: its float32 tensors cast to autocast's dtype
    outside the Function (so that autograd casts their gradients back; other dtypes are left as autocast leaves
    them) and autocast off inside, where its backward pass would otherwise meet tensors of two dtypes."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return function.apply(*tensors, *options)
    dtype = torch.get_autocast_dtype(device)
    with torch.autocast(device, enabled=False):
        return function.apply(*(tensor.to(dtype) if tensor.dtype == torch.float32 else tensor
                                for tensor in tensors), *options)


class _GRUSequence(torch.autograd.Function):
    """The recurrence of G GRU cells over T steps from h0 = 0, dropout on h after every step (the dropped h is fed
    back), with its backward pass through time written by hand: (G, B, T, 3H) input gates -> the last h (G, B, H).

    Why: autograd's recurrence concatenated the three gate gradients of every step (`chunk`'s backward), 246 ms of
    a 1.2 s profiled GRU grid step (`benchmarks/RESULTS.md`). Here each step keeps the tensors it made for the
    backward pass, which writes every step's gate gradients into slices of one input-gate gradient tensor (and of
    one temporary per step for the hidden gates); the first step, from h0 = 0, needs no matmul. h' = n + z (h - n)
    is torch's (1 - z) n + z h.
    """

    @staticmethod
    def forward(ctx, input_gates: Tensor, weight_hh: Tensor, bias_hh: Tensor, p: float, training: bool,
                keep_for_backward: bool) -> Tensor:
        G, B, T, three_h = input_gates.shape
        H = three_h // 3
        ctx.dropped = training and p > 0
        h, saved = input_gates.new_zeros(G, B, H), []
        for t in range(T):
            gates = input_gates[:, :, t]
            hidden = bias_hh.unsqueeze(1) if t == 0 else torch.baddbmm(bias_hh.unsqueeze(1), h, weight_hh)
            hidden = hidden.expand(G, B, three_h)
            rz = torch.add(gates[..., :2 * H], hidden[..., :2 * H]).sigmoid_()
            n = torch.addcmul(gates[..., 2 * H:], rz[..., :H], hidden[..., 2 * H:]).tanh_()
            step = [h, rz, n, hidden]
            h = torch.lerp(n, h, rz[..., H:])
            if ctx.dropped:
                keep = scaled_keep_mask(h, p)
                h.mul_(keep)
                step.append(keep)
            if keep_for_backward:
                saved += step
        ctx.save_for_backward(weight_hh, *saved)
        return h

    @staticmethod
    def backward(ctx, grad_h: Tensor) -> tuple[Tensor | None, ...]:
        weight_hh, *saved = ctx.saved_tensors
        per_step = 5 if ctx.dropped else 4
        steps = [saved[i:i + per_step] for i in range(0, len(saved), per_step)]
        G, B, H = grad_h.shape
        T = len(steps)
        grad_gates = grad_h.new_empty(G, B, T, 3 * H)  # of the input gates
        grad_weight = weight_hh.new_zeros(weight_hh.shape)
        grad_bias = weight_hh.new_zeros(G, 3 * H)
        for t in reversed(range(T)):
            h_prev, rz, n, hidden, *keep = steps[t]
            r, z = rz[..., :H], rz[..., H:]
            g = grad_h * keep[0] if ctx.dropped else grad_h  # through step t's dropout
            grad_n = (g * (1 - z)).mul_(1 - n * n)  # through h' = n + z (h - n) and n's tanh
            grad_hidden = torch.empty_like(grad_gates[:, :, 0])  # of the hidden gates, bias included
            torch.mul(grad_n * hidden[..., 2 * H:], r * (1 - r), out=grad_hidden[..., :H])
            torch.mul(g * (h_prev - n), z * (1 - z), out=grad_hidden[..., H:2 * H])
            torch.mul(grad_n, r, out=grad_hidden[..., 2 * H:])
            grad_gates[:, :, t, :2 * H] = grad_hidden[..., :2 * H]
            grad_gates[:, :, t, 2 * H:] = grad_n
            grad_bias += grad_hidden.sum(1)
            if t > 0:  # h0 = 0 is a constant and adds nothing to W_hh's gradient
                grad_weight.baddbmm_(h_prev.transpose(1, 2), grad_hidden)
                grad_h = torch.baddbmm(g * z, grad_hidden, weight_hh.transpose(1, 2))
        needs = ctx.needs_input_grad
        return (grad_gates if needs[0] else None, grad_weight if needs[1] else None,
                grad_bias if needs[2] else None, None, None, None)


class GroupedGRUCell(nn.Module):
    """G independent nn.GRUCell, written with batched matmuls (vmap does not support nn.GRU).

    Same equations, gate order (r, z, n) and init as torch: n = tanh(W_in x + b_in + r * (W_hn h + b_hn)),
    h' = (1 - z) * n + z * h. Weights are stored transposed for bmm: weight_ih (G, in, 3H), weight_hh (G, H, 3H).
    """

    def __init__(self, num_members: int, input_size: int, hidden_size: int, generators: Generators = None) -> None:
        super().__init__()
        _check_generators(num_members, generators)
        self.num_members, self.input_size, self.hidden_size = num_members, input_size, hidden_size
        self.weight_ih = nn.Parameter(torch.empty(num_members, input_size, 3 * hidden_size))
        self.weight_hh = nn.Parameter(torch.empty(num_members, hidden_size, 3 * hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(num_members, 3 * hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(num_members, 3 * hidden_size))
        bound = 1 / math.sqrt(hidden_size)
        with torch.no_grad():
            for g in range(num_members):
                generator = _generator(generators, g)
                # nn.GRUCell draws weight_ih, weight_hh, bias_ih, bias_hh in this order, in (3H, ...) layout;
                # .t() is a no-op on the 1-d biases.
                for param in (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh):
                    draw = torch.empty(param.shape[1:][::-1]).uniform_(-bound, bound, generator=generator)
                    param[g].copy_(draw.t())

    def project_input(self, x: Tensor) -> Tensor:
        """W_i x + b_i for (G, ..., in) inputs; done once for a whole sequence, outside the recurrence."""
        flat, middle = _flatten_members(x)
        out = torch.baddbmm(self.bias_ih.unsqueeze(1), flat, self.weight_ih)
        return out.view(self.num_members, *middle, 3 * self.hidden_size)

    def recur(self, input_gates: Tensor, h: Tensor) -> Tensor:
        """One step from precomputed input gates (G, B, 3H) and the hidden state (G, B, H), through autograd. The
        GRU head runs whole sequences with `run`; this step is the reference its tests compare `run` with."""
        hidden_gates = torch.baddbmm(self.bias_hh.unsqueeze(1), h, self.weight_hh)
        i_r, i_z, i_n = input_gates.chunk(3, dim=-1)
        h_r, h_z, h_n = hidden_gates.chunk(3, dim=-1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return self.recur(self.project_input(x), h)

    def run(self, input_gates: Tensor, dropout_p: float = 0.0, training: bool = False) -> Tensor:
        """The last hidden state after all T steps from h0 = 0, for input gates (G, B, T, 3H) from
        `project_input`; with `training`, dropout after every step, the dropped h fed back (`_GRUSequence`)."""
        keep = torch.is_grad_enabled() and any(tensor.requires_grad
                                               for tensor in (input_gates, self.weight_hh, self.bias_hh))
        return _apply_as_autocast_would(_GRUSequence, (input_gates, self.weight_hh, self.bias_hh), dropout_p,
                                        training, keep)

    @torch.no_grad()
    def load_gru_cell(self, g: int, cell: nn.GRUCell) -> None:
        """Overwrite member g with the weights of a plain nn.GRUCell."""
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(self, name)[g].copy_(getattr(cell, name).t())

    @torch.no_grad()
    def to_gru_cell(self, g: int) -> nn.GRUCell:
        """Member g as a plain nn.GRUCell (a copy)."""
        cell = nn.GRUCell(self.input_size, self.hidden_size, device=self.weight_ih.device, dtype=self.weight_ih.dtype)
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(getattr(self, name)[g].t())
        return cell


class GroupedLayerNorm(nn.Module):
    """LayerNorm over the last dim with per-member affine parameters (G, dim), initialised to 1 and 0."""

    def __init__(self, num_members: int, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(num_members, dim))
        self.bias = nn.Parameter(torch.zeros(num_members, dim))

    def forward(self, x: Tensor) -> Tensor:
        shape = (x.shape[0], *([1] * (x.dim() - 2)), self.dim)
        return torch.addcmul(self.bias.view(shape), F.layer_norm(x, (self.dim,), eps=self.eps), self.weight.view(shape))


class _ReLUDropoutMLP(torch.autograd.Function):
    """Training forward and backward of Linear -> ReLU -> Dropout -> Linear over members, (G, N, in) -> (G, N, out).

    Written by hand because the hidden activations (330 members x 256 examples x 512 units in the MLP grid) are
    the one large tensor of a probe step, and every pass over them costs more than the matmuls (K = 32 and 10;
    `benchmarks/RESULTS.md`, "Probe grids"):
    - fc1's bias rides in its matmul (a column of ones on the input), not in a copy of the bias into the output,
      and its gradient comes out of the weight gradient's matmul, not from a sum over the hidden gradient;
    - the dropout mask multiplies the fc1 output in place, ReLU follows in place, and the backward pass masks the
      hidden gradient from the kept output alone (ReLU's `threshold_backward`): no mask is kept;
    - dropout's 1 / (1 - p) rides on the small tensors: fc2's matmul forward, the output gradient backward;
    - fc2's weight gradient is formed transposed, (out, hidden), the layout MKL's batched matmul runs twice as fast.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight1: Tensor, bias1: Tensor, weight2: Tensor, bias2: Tensor,
                p: float) -> Tensor:
        x_ones = torch.cat([x, x.new_ones(*x.shape[:2], 1)], dim=2)
        hidden = torch.bmm(x_ones, torch.cat([weight1, bias1.unsqueeze(1)], dim=1))
        if p > 0:
            hidden.mul_(dropout_keep_mask(hidden, p))
        hidden.relu_()
        ctx.scale = 1 / (1 - p)
        ctx.save_for_backward(x_ones, weight1, weight2, hidden)
        return torch.baddbmm(bias2.unsqueeze(1), hidden, weight2, alpha=ctx.scale)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x_ones, weight1, weight2, hidden = ctx.saved_tensors
        scaled_out = grad_out * ctx.scale
        grad_hidden = torch.bmm(scaled_out, weight2.transpose(1, 2))
        torch.ops.aten.threshold_backward.grad_input(grad_hidden, hidden, 0, grad_input=grad_hidden)
        needs = ctx.needs_input_grad
        grad_fc1 = torch.bmm(x_ones.transpose(1, 2), grad_hidden) if needs[1] or needs[2] else None
        return (torch.bmm(grad_hidden, weight1.transpose(1, 2)) if needs[0] else None,
                grad_fc1[:, :-1] if needs[1] else None,
                grad_fc1[:, -1] if needs[2] else None,
                torch.bmm(scaled_out.transpose(1, 2), hidden).transpose(1, 2) if needs[3] else None,
                grad_out.sum(1) if needs[4] else None,
                None)


class GroupedMLP(nn.Module):
    """Linear -> ReLU -> Dropout -> Linear per member; dropout masks are independent across members.

    ReLU and dropout act in place on the hidden activations, forward and (in training, `_ReLUDropoutMLP`) backward.
    """

    def __init__(self, num_members: int, in_features: int, hidden_features: int, out_features: int,
                 dropout: float = 0.0, generators: Generators = None) -> None:
        super().__init__()
        self.fc1 = GroupedLinear(num_members, in_features, hidden_features, generators)
        self.fc2 = GroupedLinear(num_members, hidden_features, out_features, generators)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return self.fc2(self.fc1(x).relu_())
        flat, middle = _flatten_members(x)
        out = _apply_as_autocast_would(_ReLUDropoutMLP, (flat, self.fc1.weight, self.fc1.bias, self.fc2.weight,
                                                         self.fc2.bias), self.dropout)
        return out.view(x.shape[0], *middle, self.fc2.out_features)


def _expand_key_mask(key_mask: Tensor) -> Tensor:
    """(L,), (B, L) or (G, B, L) -> (G|1, B|1, 1, 1, L), to broadcast over (G, B, heads, queries, keys)."""
    while key_mask.dim() < 3:
        key_mask = key_mask.unsqueeze(0)
    return key_mask[:, :, None, None, :]


class GroupedMultiheadSelfAttention(nn.Module):
    """Multi-head self-attention per member, no attention dropout; q, k, v and output as separate linears (q, k
    and v computed by one matmul over their stacked weights).

    `key_mask` (bool, True = excluded) of shape (L,), (B, L) or (G, B, L) removes keys from every query's
    softmax, so they get exactly zero weight (masking all keys of a query gives NaN, as in torch).
    """

    def __init__(self, num_members: int, d_model: int, num_heads: int, generators: Generators = None) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.query = GroupedLinear(num_members, d_model, d_model, generators)
        self.key = GroupedLinear(num_members, d_model, d_model, generators)
        self.value = GroupedLinear(num_members, d_model, d_model, generators)
        self.out = GroupedLinear(num_members, d_model, d_model, generators)

    def _heads(self, x: Tensor) -> Tensor:
        """(G, B, L, D) -> (G, B, heads, L, head_dim)."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2)

    def _project_qkv(self, x: Tensor) -> Tensor:
        """q, k and v side by side, (G, ..., 3D), from one matmul: x is read once, and its gradient comes out of one
        matmul instead of three summed."""
        flat, middle = _flatten_members(x)
        layers = (self.query, self.key, self.value)
        out = torch.baddbmm(torch.cat([layer.bias for layer in layers], dim=1).unsqueeze(1), flat,
                            torch.cat([layer.weight for layer in layers], dim=2))
        return out.view(x.shape[0], *middle, out.shape[-1])

    def forward(self, x: Tensor, key_mask: Tensor | None = None,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """(G, B, L, D) -> (output (G, B, L, D), head-averaged weights (G, B, L, L) or None)."""
        q, k, v = (self._heads(part) for part in self._project_qkv(x).chunk(3, dim=-1))
        mask = None if key_mask is None else _expand_key_mask(key_mask.to(torch.bool))
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores.masked_fill(mask, float("-inf"))
            weights = scores.softmax(dim=-1)
            attended, averaged = weights @ v, weights.mean(dim=2)
        else:
            # The fused kernels avoid materialising the (G, B, heads, L, L) scores in training; they want 4-d inputs.
            keep = None if mask is None else (~mask).expand(*q.shape[:2], 1, 1, -1).flatten(0, 1)
            attended = F.scaled_dot_product_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                                                      attn_mask=keep).unflatten(0, q.shape[:2])
            averaged = None
        return self.out(attended.transpose(-3, -2).flatten(-2)), averaged


class GroupedTransformerBlock(nn.Module):
    """Post-norm encoder block per member: x = LN(x + attn(x)); x = LN(x + FFN(x)).

    FFN = Linear(D, ffn_dim) -> ReLU -> Dropout -> Linear(ffn_dim, D) -> Dropout, as in the original probe code.
    """

    def __init__(self, num_members: int, d_model: int = 256, num_heads: int = 4, ffn_dim: int = 512,
                 dropout: float = 0.25, generators: Generators = None) -> None:
        super().__init__()
        self.attention = GroupedMultiheadSelfAttention(num_members, d_model, num_heads, generators)
        self.ffn = GroupedMLP(num_members, d_model, ffn_dim, d_model, dropout, generators)
        self.norm1 = GroupedLayerNorm(num_members, d_model)
        self.norm2 = GroupedLayerNorm(num_members, d_model)
        self.dropout = dropout

    def forward(self, x: Tensor, key_mask: Tensor | None = None,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """(G, B, L, D) -> (G, B, L, D) and the head-averaged attention weights (G, B, L, L) when asked."""
        attended, weights = self.attention(x, key_mask, need_weights)
        x = self.norm1(x + attended)
        x = self.norm2(x + dropout(self.ffn(x), self.dropout, self.training))
        return x, weights


def _grouped(params: Iterable[Tensor], num_members: int) -> list[Tensor]:
    params = list(params)
    for p in params:
        if p.dim() == 0 or p.shape[0] != num_members:
            raise ValueError(f"every parameter needs a leading member dim of {num_members}, got shape {tuple(p.shape)}")
    return params


@torch.no_grad()
def grouped_clip_grad_norm_(params: Iterable[Tensor], max_norm: float, num_members: int) -> Tensor:
    """torch.nn.utils.clip_grad_norm_ applied to each member separately; returns the (G,) pre-clip norms.

    Member g's norm is taken over its slices of all parameters (its own global norm), with torch's formula:
    grads *= min(1, max_norm / (norm + 1e-6)).
    """
    grads = [p.grad for p in _grouped(params, num_members) if p.grad is not None]
    if not grads:
        return torch.zeros(num_members)
    norms = torch.stack([grad.reshape(num_members, -1).norm(dim=1) for grad in grads]).norm(dim=0)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(member_view(scale, grad).to(grad.dtype))
    return norms


class GroupedAdam(torch.optim.Optimizer):
    """torch.optim.Adam (L2 weight decay, not AdamW) with a learning rate per member: `lr` has shape (G,), or each
    parameter group {"params": ..., "lr": (G_group,)} gives its own members' rates.

    Exact per member: the weight decay term wd * p enters the gradient before the moments, the moments are
    elementwise, and the update lr * m_hat / (sqrt(v_hat) + eps) is linear in lr, so scaling each member's slice
    of the update by its own lr gives every member exactly torch.optim.Adam(lr=lr[g], weight_decay=wd).
    Every parameter must carry the leading member dim G.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: Sequence[float] | Tensor | None = None,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        groups = list(params)
        if not groups or not isinstance(groups[0], dict):
            groups = [{"params": groups, "lr": lr}]
        for group in groups:  # parameter groups (e.g. member chunks) each carry their members' lr
            group["params"] = list(group["params"])
            group["lr"] = torch.as_tensor(group["lr"], dtype=torch.float64).flatten()
            if (group["lr"] < 0).any():
                raise ValueError(f"learning rates must be >= 0, got {group['lr'].tolist()}")
            _grouped(group["params"], group["lr"].numel())
        super().__init__(groups, dict(betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group, beta1, beta2)
        return loss

    def _update(self, p: Tensor, group: dict, beta1: float, beta2: float) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        grad = p.grad if group["weight_decay"] == 0 else p.grad.add(p, alpha=group["weight_decay"])
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        state["step"] += 1
        bias_correction1 = 1 - beta1 ** state["step"]
        bias_correction2 = 1 - beta2 ** state["step"]
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(group["eps"])
        if group["lr"].device != p.device:  # move once: a host copy every step would stall the GPU stream
            group["lr"] = group["lr"].to(p.device)
        step_size = (group["lr"] / bias_correction1).to(p.dtype)
        p.sub_(member_view(step_size, p) * exp_avg / denom)
