"""Probe heads: a grouped grid trains exactly like its members trained one by one, plus the heads' contracts."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trajrep.errors import TrajrepError
from trajrep.nn.grouped import (GroupedAdam, GroupedGRUCell, GroupedLinear, GroupedMLP, dropout,
                                dropout_keep_mask, grouped_clip_grad_norm_, member_generators)
from trajrep.probe.kinds import build_head, default_options, head_kinds
from trajrep.nn.probes import (ContinuousOptions, ContinuousTransformerHead, GRUHead, GRUOptions, MeanHead, MLPHead,
                               MLPOptions, TransformerHead, TransformerOptions, WeightedHead,
                               clip_grad_norm_per_member_, member_losses, random_time_subset)

# The equivalence grid: 2 learning rates x 2 seeds = 4 members, float64, dropout 0 (masks cannot be matched).
LRS, SEEDS = (1e-2, 3e-3), (0, 1)
MEMBERS = [(lr, seed) for lr in LRS for seed in SEEDS]
N, BATCH, T, D_IN, C, EPOCHS = 32, 8, 3, 8, 3, 3
WEIGHT_DECAY, MAX_NORM = 1e-5, 0.05


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def toy_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(123)
    return torch.randn(N, T, D_IN, generator=generator), torch.randint(0, C, (N,), generator=generator)


def batch_orders(seed: int) -> list[torch.Tensor]:
    """Each member shuffles with its own seeded generator: its own batch order every epoch."""
    generator = torch.Generator().manual_seed(1000 + seed)
    return [torch.randperm(N, generator=generator) for _ in range(EPOCHS)]


def steps():
    for epoch in range(EPOCHS):
        for step in range(N // BATCH):
            yield epoch, slice(step * BATCH, (step + 1) * BATCH)


def train_grouped(head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> bool:
    """GroupedAdam with per-member lr and per-member clipping; returns whether clipping ever triggered."""
    optimizer = GroupedAdam(head.parameters(), lr=[lr for lr, _ in MEMBERS], weight_decay=WEIGHT_DECAY)
    orders = [batch_orders(seed) for _, seed in MEMBERS]
    clipped = False
    head.train()
    for epoch, rows in steps():
        index = torch.stack([order[epoch][rows] for order in orders])
        optimizer.zero_grad()
        member_losses(head(x[index]), y[index]).sum().backward()
        clipped |= bool((clip_grad_norm_per_member_(head, MAX_NORM) > MAX_NORM).any())
        optimizer.step()
    return clipped


def train_plain(model: nn.Module, member: int, x: torch.Tensor, y: torch.Tensor) -> None:
    lr, seed = MEMBERS[member]
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    order = batch_orders(seed)
    model.train()
    for epoch, rows in steps():
        index = order[epoch][rows]
        optimizer.zero_grad()
        F.cross_entropy(model(x[index]), y[index]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        optimizer.step()


class PlainMLP(nn.Module):
    def __init__(self, time_index: int, hidden: int) -> None:
        super().__init__()
        self.time_index = time_index
        self.fc1, self.fc2 = nn.Linear(D_IN, hidden), nn.Linear(hidden, C)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x[:, self.time_index])))


class PlainGRU(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.cell, self.out = nn.GRUCell(D_IN, hidden), nn.Linear(hidden, C)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], self.cell.hidden_size)
        for i in range(x.shape[1]):
            h = self.cell(x[:, i], h)
        return self.out(h)


def reference_positions(length: int, dim: int) -> torch.Tensor:
    """PE[pos, 2i] = sin(pos / 10000^(2i/dim)), PE[pos, 2i+1] = cos(same)."""
    code = torch.zeros(length, dim)
    for pos in range(length):
        for i in range(0, dim, 2):
            code[pos, i] = math.sin(pos / 10000 ** (i / dim))
            code[pos, i + 1] = math.cos(pos / 10000 ** (i / dim))
    return code


class PlainTransformer(nn.Module):
    """One post-norm block (nn.MultiheadAttention) applied twice, CLS appended last; loaded from a grouped member."""

    def __init__(self, head: TransformerHead, g: int, d_model: int, num_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.proj = head.token_proj.to_linear(g)
        self.attention = nn.MultiheadAttention(d_model, num_heads, batch_first=True)
        attention = head.block.attention
        with torch.no_grad():
            parts = [attention.query.to_linear(g), attention.key.to_linear(g), attention.value.to_linear(g)]
            self.attention.in_proj_weight.copy_(torch.cat([p.weight for p in parts]))
            self.attention.in_proj_bias.copy_(torch.cat([p.bias for p in parts]))
            self.attention.out_proj.load_state_dict(attention.out.to_linear(g).state_dict())
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.fc1, self.fc2 = head.block.ffn.fc1.to_linear(g), head.block.ffn.fc2.to_linear(g)
        self.cls = nn.Parameter(head.cls[g].detach().clone())
        self.out = head.classifier.to_linear(g)
        self.register_buffer("positions", reference_positions(T, d_model))
        self.last_weights = None

    def forward(self, x):
        h = self.proj(x) + self.positions
        h = torch.cat([h, self.cls.expand(x.shape[0], 1, -1)], dim=1)
        for _ in range(2):
            attended, self.last_weights = self.attention(h, h, h, need_weights=True)
            h = self.norm1(h + attended)
            h = self.norm2(h + self.fc2(torch.relu(self.fc1(h))))
        return self.out(h[:, -1])


def assert_members_match(head: nn.Module, plains: list[nn.Module], x: torch.Tensor) -> None:
    head.eval()
    logits = head(x)  # the shared (N, T, d) batch, broadcast to all members
    for g, plain in enumerate(plains):
        plain.eval()
        torch.testing.assert_close(logits[g], plain(x), atol=1e-6, rtol=0)


def test_mlp_grid_trains_like_separate_mlps():
    x, y = toy_data()
    time_index = [0, 1, 2, 1]  # the per-t grid: members also differ in the time they read
    head = MLPHead(len(MEMBERS), D_IN, T, [C], [seed for _, seed in MEMBERS], MLPOptions(hidden_dim=16, dropout=0.0),
                   time_index=time_index)
    plains = []
    for g, (_, seed) in enumerate(MEMBERS):
        torch.manual_seed(seed)
        plain = PlainMLP(time_index[g], 16)
        torch.testing.assert_close(plain.fc1.weight, head.mlp.fc1.to_linear(g).weight, atol=0, rtol=0)
        torch.testing.assert_close(plain.fc2.bias, head.mlp.fc2.to_linear(g).bias, atol=0, rtol=0)
        plains.append(plain)
    assert train_grouped(head, x, y), "the test must make clipping trigger"
    for g, plain in enumerate(plains):
        train_plain(plain, g, x, y)
    assert_members_match(head, plains, x)
    torch.testing.assert_close(head.mlp.fc1.to_linear(3).weight, plains[3].fc1.weight, atol=1e-6, rtol=0)


def test_gru_grid_trains_like_separate_grus():
    x, y = toy_data()
    head = GRUHead(len(MEMBERS), D_IN, T, [C], [seed for _, seed in MEMBERS], GRUOptions(hidden_dim=12, dropout=0.0))
    plains = []
    for g, (_, seed) in enumerate(MEMBERS):
        torch.manual_seed(seed)
        plain = PlainGRU(12)  # seeded init: GRUCell then Linear, the head's draw order
        torch.testing.assert_close(plain.cell.weight_hh, head.cell.to_gru_cell(g).weight_hh, atol=0, rtol=0)
        torch.testing.assert_close(plain.out.weight, head.classifier.to_linear(g).weight, atol=0, rtol=0)
        plains.append(plain)
    assert train_grouped(head, x, y)
    for g, plain in enumerate(plains):
        train_plain(plain, g, x, y)
    assert_members_match(head, plains, x)


def test_gru_recurrence_backward_through_time_matches_autograd_with_dropout():
    """The GRU's hand-written backward pass through time against autograd on the single-step cell, same masks."""
    head = GRUHead(3, D_IN, T, [C], [0, 1, 2], GRUOptions(hidden_dim=6, dropout=0.25)).train()
    x = torch.randn(3, 5, T, D_IN, requires_grad=True)
    inputs = (x, *head.parameters())
    weights = torch.randn(3, 5, C)
    torch.manual_seed(11)
    fast = torch.autograd.grad((head(x) * weights).sum(), inputs)
    torch.manual_seed(11)
    gates, h = head.cell.project_input(x), x.new_zeros(3, 5, 6)
    for step in gates.unbind(2):
        h = dropout(head.cell.recur(step, h), 0.25, training=True)
    reference = torch.autograd.grad((head.classifier(h) * weights).sum(), inputs)
    for got, expected in zip(fast, reference):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("kind", [MLPHead, GRUHead, TransformerHead])  # the Transformer: its FFN is the MLP's
def test_hand_written_backward_passes_run_under_bf16_autocast(kind):
    """The MLP's and the GRU's own backward passes after a forward pass under autocast (the backward pass runs
    outside it, as Lightning's does): float32 gradients within bf16's error of the float32 ones."""
    extra = {"time_index": [0, 1]} if kind is MLPHead else {}
    head = kind(2, D_IN, T, [C], [0, 1], kind.Options(dropout=0.0), **extra).float().train()
    x = torch.randn(2, 8, T, D_IN, dtype=torch.float32)
    exact = torch.autograd.grad(head(x).square().sum(), list(head.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(x).float().square().sum()
    low = torch.autograd.grad(loss, list(head.parameters()))
    assert all(got.dtype == torch.float32 for got in low)
    low, exact = torch.cat([got.flatten() for got in low]), torch.cat([expected.flatten() for expected in exact])
    assert (low - exact).norm() <= 0.05 * exact.norm()  # bf16 rounding, and a few ReLUs near 0 flip


def test_bias_only_training_of_the_gru_gets_its_gradient():
    head = GRUHead(2, D_IN, T, [C], [0, 1], GRUOptions(hidden_dim=6, dropout=0.0))
    head.requires_grad_(False)
    head.cell.bias_hh.requires_grad_(True)
    head(torch.randn(2, 4, T, D_IN)).sum().backward()
    assert head.cell.bias_hh.grad is not None and head.cell.bias_hh.grad.abs().sum() > 0


def test_transformer_grid_trains_like_separate_transformers():
    x, y = toy_data()
    sizes = dict(d_model=16, num_heads=4, ffn_dim=24)
    head = TransformerHead(len(MEMBERS), D_IN, T, [C], [seed for _, seed in MEMBERS],
                           TransformerOptions(dropout=0.0, **sizes))
    plains = [PlainTransformer(head, g, **sizes) for g in range(len(MEMBERS))]
    assert train_grouped(head, x, y)
    for g, plain in enumerate(plains):
        train_plain(plain, g, x, y)
    assert_members_match(head, plains, x)
    _, attention = head(x, return_attention=True)
    for g, plain in enumerate(plains):
        plain(x)
        torch.testing.assert_close(attention[g], plain.last_weights[:, -1], atol=1e-6, rtol=0)


def test_grouped_linear_init_and_forward_match_nn_linear():
    seeds = [3, 7, 3]
    layer = GroupedLinear(3, 5, 4, member_generators(seeds))
    x = torch.randn(3, 6, 2, 5)
    out = layer(x)
    assert out.shape == (3, 6, 2, 4)
    for g, seed in enumerate(seeds):
        torch.manual_seed(seed)
        plain = nn.Linear(5, 4)
        torch.testing.assert_close(layer.to_linear(g).weight, plain.weight, atol=0, rtol=0)
        torch.testing.assert_close(out[g], plain(x[g]), atol=1e-12, rtol=0)
    layer.load_linear(1, nn.Linear(5, 4))
    torch.testing.assert_close(layer.bias[2], layer.bias[0], atol=0, rtol=0)


def test_grouped_gru_cell_equals_nn_gru_cell():
    cells = [nn.GRUCell(5, 7) for _ in range(3)]
    grouped = GroupedGRUCell(3, 5, 7)
    for g, cell in enumerate(cells):
        grouped.load_gru_cell(g, cell)
    x, h = torch.randn(3, 4, 5), torch.randn(3, 4, 7)
    out = grouped(x, h)
    for g, cell in enumerate(cells):
        torch.testing.assert_close(out[g], cell(x[g], h[g]), atol=1e-10, rtol=0)
        torch.testing.assert_close(grouped.to_gru_cell(g).weight_ih, cell.weight_ih, atol=0, rtol=0)


def small_transformer() -> TransformerHead:
    return TransformerHead(2, D_IN, T, [C], [0, 1], TransformerOptions(d_model=16, num_heads=4, ffn_dim=24))


def test_transformer_attention_weights_and_key_mask():
    head = small_transformer().eval()
    x = torch.randn(2, 5, T, D_IN)
    logits, attention = head(x, return_attention=True)
    assert logits.shape == (2, 5, C) and attention.shape == (2, 5, T + 1)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 5), atol=1e-12, rtol=0)
    for masked in (1, T):  # a time token, then the CLS key
        key_mask = torch.zeros(T + 1, dtype=torch.bool)
        key_mask[masked] = True
        masked_logits, masked_attention = head(x, key_mask=key_mask, return_attention=True)
        assert (masked_attention[..., masked] == 0).all()
        torch.testing.assert_close(masked_attention.sum(-1), torch.ones(2, 5), atol=1e-12, rtol=0)
        # the fused training path and the weight-returning path agree
        torch.testing.assert_close(head(x, key_mask=key_mask), masked_logits, atol=1e-10, rtol=0)
    per_example = torch.zeros(2, 5, T + 1, dtype=torch.bool)
    per_example[0, 2, 0] = True
    assert head(x, key_mask=per_example, return_attention=True)[1][0, 2, 0] == 0


def test_transformer_cls_is_the_last_token_and_feeds_the_output():
    head = small_transformer().eval()
    only_cls = torch.tensor([True] * T + [False])  # hide every time token: CLS can only attend to itself
    x1, x2 = torch.randn(2, 3, T, D_IN), torch.randn(2, 3, T, D_IN)
    logits1, attention = head(x1, key_mask=only_cls, return_attention=True)
    torch.testing.assert_close(attention[..., -1], torch.ones(2, 3), atol=0, rtol=0)
    torch.testing.assert_close(head(x2, key_mask=only_cls), logits1, atol=1e-12, rtol=0)
    with pytest.raises(TrajrepError, match="built for 3 times"):
        head(torch.randn(2, 3, T + 1, D_IN))


def test_continuous_head_runs_on_unseen_times():
    head = ContinuousTransformerHead(2, D_IN, 3, [C], [0, 1], ContinuousOptions(d_model=16, num_heads=4, ffn_dim=24))
    optimizer = GroupedAdam(head.parameters(), lr=[1e-3, 1e-3])
    train_t = torch.tensor([0.0, 0.5, 1.0])
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        subset = random_time_subset(3, generator=generator)
        assert (subset.diff() > 0).all()
        x, y = torch.randn(2, 4, 3, D_IN), torch.randint(0, C, (2, 4))
        optimizer.zero_grad()
        member_losses(head(x[:, :, subset], train_t[subset]), y).sum().backward()
        optimizer.step()
    head.eval()
    logits, attention = head(torch.randn(5, 2, D_IN), torch.tensor([0.25, 0.75]), return_attention=True)
    assert logits.shape == (2, 5, C) and attention.shape == (2, 5, 3)
    assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="time values"):
        head(torch.randn(5, 2, D_IN))


def test_clipping_is_per_member():
    layer = GroupedLinear(2, 3, 4)
    layer.weight.grad = torch.cat([torch.full((1, 3, 4), 1e3), torch.full((1, 3, 4), 1e-3)])
    layer.bias.grad = torch.cat([torch.full((1, 4), 1e3), torch.full((1, 4), 1e-3)])
    small = (layer.weight.grad[1].clone(), layer.bias.grad[1].clone())
    plain = layer.to_linear(0)
    plain.weight.grad, plain.bias.grad = layer.weight.grad[0].T.clone(), layer.bias.grad[0].clone()
    norms = grouped_clip_grad_norm_(layer.parameters(), 1.0, 2)
    expected = torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
    torch.testing.assert_close(norms[0], expected)
    torch.testing.assert_close(layer.weight.grad[0].T, plain.weight.grad, atol=1e-12, rtol=0)
    clipped = torch.cat([layer.weight.grad[0].flatten(), layer.bias.grad[0]]).norm()
    torch.testing.assert_close(clipped, torch.tensor(1.0), atol=1e-5, rtol=0)
    assert torch.equal(layer.weight.grad[1], small[0]) and torch.equal(layer.bias.grad[1], small[1])


@pytest.mark.parametrize("kind", sorted(head_kinds()))
def test_every_head_gives_each_member_logits_that_its_own_loss_trains(kind):
    extra = dict(time_index=[0, 2]) if kind in ("mlp", "linear") else {}
    options = default_options(kind)
    if kind in ("transformer", "continuous"):
        options = dataclasses.replace(options, d_model=16, ffn_dim=24)
    head = build_head(kind, options, num_members=2, feature_dim=D_IN, num_times=T, num_classes=[3], seeds=[0, 1],
                      **extra)
    x, t = torch.randn(2, 4, T, D_IN), torch.linspace(0, 1, T)
    logits = head(x, t)
    assert logits.shape == (2, 4, 3)
    labels = torch.randint(0, 3, (2, 4))
    loss = member_losses(logits, labels)
    expected = torch.stack([F.cross_entropy(logits[g], labels[g]) for g in range(2)])
    torch.testing.assert_close(loss, expected)
    loss.sum().backward()
    assert all(p.grad is not None for p in head.parameters())


def test_dropout_masks_differ_between_members():
    head = MLPHead(2, D_IN, 1, [C], [5, 5])  # identical members
    x = torch.randn(16, 1, D_IN)
    head.eval()
    torch.testing.assert_close(head(x)[0], head(x)[1], atol=0, rtol=0)
    head.train()
    assert not torch.allclose(head(x)[0], head(x)[1])


@pytest.mark.parametrize("p", [0.25, 0.1])  # 0.1 is not a multiple of 1/256: the 16-bit path
def test_dropout_keeps_one_minus_p_and_preserves_the_mean(p):
    x = torch.randn(200, 1000)
    torch.manual_seed(3)
    keep = dropout_keep_mask(x, p)
    assert keep.shape == x.shape and keep.dtype == x.dtype and set(keep.unique().tolist()) == {0.0, 1.0}
    keep = keep.bool()
    assert abs(keep.double().mean().item() - (1 - p)) < 4 * math.sqrt(p * (1 - p) / x.numel())
    assert keep.double().mean(dim=0).std().item() < 0.05  # no stuck positions (e.g. an unfilled byte lane)
    torch.manual_seed(3)
    dropped = dropout(x, p, training=True)
    torch.testing.assert_close(dropped[keep], x[keep] / (1 - p))
    assert (dropped[~keep] == 0).all()
    assert dropout(x, p, training=False) is x
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        dropout_keep_mask(x, 1.0)


@pytest.mark.parametrize("p, kept", [(1e-6, 1.0), (1 - 1e-6, 0.0)])  # p rounds to 0 or to 1 at 16 bits
def test_dropout_masks_at_probabilities_that_round_to_0_or_1(p, kept):
    assert (dropout_keep_mask(torch.randn(50, 40), p) == kept).all()


def test_fused_relu_dropout_matches_relu_then_dropout_with_the_same_mask():
    mlp = GroupedMLP(2, D_IN, 16, C, dropout=0.25).train()
    x = torch.randn(2, 5, D_IN, requires_grad=True)
    torch.manual_seed(7)
    fused = mlp(x)
    torch.manual_seed(7)
    keep = dropout_keep_mask(mlp.fc1(x), 0.25).bool()
    reference = mlp.fc2(torch.where(keep, F.relu(mlp.fc1(x)), 0) / 0.75)
    torch.testing.assert_close(fused, reference)
    inputs = (x, *mlp.parameters())  # the backward pass is written by hand: every gradient is checked
    weights = torch.randn_like(fused)  # a loss whose output gradient differs by element
    for grad_fused, grad_reference in zip(torch.autograd.grad((fused * weights).sum(), inputs),
                                          torch.autograd.grad((reference * weights).sum(), inputs)):
        torch.testing.assert_close(grad_fused, grad_reference)


def test_mlp_training_backward_passes_gradcheck_without_dropout():
    mlp = GroupedMLP(2, 3, 5, 2, dropout=0.0).double().train()
    x = torch.randn(2, 4, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *params: torch.func.functional_call(
        mlp, dict(zip([name for name, _ in mlp.named_parameters()], params)), (x,)), (x, *mlp.parameters()))


def test_weighted_head_starts_as_the_mean_head():
    x = torch.randn(2, 4, T, D_IN)
    weighted = WeightedHead(2, D_IN, T, [C], [0, 1]).eval()
    mean = MeanHead(2, D_IN, T, [C], [0, 1]).eval()
    torch.testing.assert_close(weighted(x), mean(x), atol=1e-12, rtol=0)


def test_configuration_errors():
    with pytest.raises(TrajrepError, match="valid kinds: .*continuous.*gru.*mlp.*transformer"):
        default_options("lstm")
    with pytest.raises(TrajrepError, match="needs time_index"):
        MLPHead(1, 4, 3, [2], [0])
    with pytest.raises(TrajrepError, match="one seed per probe member"):
        GRUHead(2, 4, 3, [2], [0])


def test_grouped_adam_matches_adam_per_member_with_l2_weight_decay():
    lrs, weight_decay = [1e-1, 1e-3, 0.0], 0.5  # a large decay separates L2 from decoupled (AdamW) decay
    layer = GroupedLinear(3, 4, 2)
    plains = [layer.to_linear(g) for g in range(3)]
    optimizer = GroupedAdam(layer.parameters(), lr=lrs, weight_decay=weight_decay)
    plain_optimizers = [torch.optim.Adam(p.parameters(), lr=lr, weight_decay=weight_decay)
                        for p, lr in zip(plains, lrs)]
    generator = torch.Generator().manual_seed(0)
    for step in range(4):
        if step == 2:  # the state survives a checkpoint round trip
            state = optimizer.state_dict()
            optimizer = GroupedAdam(layer.parameters(), lr=[9.0, 9.0, 9.0], weight_decay=weight_decay)
            optimizer.load_state_dict(state)
        layer.weight.grad = torch.randn(3, 4, 2, generator=generator)
        layer.bias.grad = torch.randn(3, 2, generator=generator)
        for g, (plain, plain_optimizer) in enumerate(zip(plains, plain_optimizers)):
            plain.weight.grad, plain.bias.grad = layer.weight.grad[g].T.clone(), layer.bias.grad[g].clone()
            plain_optimizer.step()
        optimizer.step()
    for g, plain in enumerate(plains):
        torch.testing.assert_close(layer.to_linear(g).weight, plain.weight, atol=1e-12, rtol=0)
        torch.testing.assert_close(layer.bias[g], plain.bias, atol=1e-12, rtol=0)
