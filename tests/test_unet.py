"""The score U-Net's shape and initialisation follow the reference NCSN++ (method §4): latent bottleneck, near-zero
closing layers, one attention per up level, learnt skips on resampling blocks."""

import math

import pytest
import torch
from torch import nn

from trajrep.nn.unet import ResBlock, ScoreUNet, SelfAttention, variance_scaling_
from trajrep.pretrain.module import PretrainModule

LATENT = 8
TINY = dict(nf=4, num_res_blocks=1, dropout=0.0)
# Sizes the data modules serve and the ch_mult used there (method §4); 28 px is not a multiple of 8, so it gets the
# three-level ch_mult that halves it twice (28 -> 14 -> 7).
SIZES = [(28, (1, 2, 2), (14,)), (32, (1, 2, 2, 2), (16,)), (64, (1, 2, 2), (16,)), (84, (1, 2, 2), (21,))]
CIFAR = dict(image_channels=3, image_size=32, latent_dim=128, nf=16, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
             attn_resolutions=(16,))


def inputs(size: int, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 1, size, size, generator=generator), torch.randn(batch, generator=generator),
            torch.randn(batch, LATENT, generator=generator))


def perturb(net: nn.Module, seed: int = 1) -> nn.Module:
    """Every conv and linear (and the near-zero ones) drawn at scale 1: a net whose branches all carry signal."""
    torch.manual_seed(seed)
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            variance_scaling_(module.weight, 1.0)
            nn.init.normal_(module.bias, std=0.1)
    return net


@pytest.mark.parametrize("size,ch_mult,attn", SIZES)
def test_builds_runs_and_trains_with_the_bottleneck_at_every_size(size, ch_mult, attn):
    net = ScoreUNet(1, size, LATENT, ch_mult=ch_mult, attn_resolutions=attn, **TINY)
    assert net.bottleneck is not None and net.bottleneck_size == size // 2 ** (len(ch_mult) - 1)
    x_t, log_sigma, z = inputs(size)
    z.requires_grad_(True)
    h = net(x_t, log_sigma, z)
    assert h.shape == x_t.shape and torch.isfinite(h).all()
    (h + torch.randn_like(h)).square().sum().backward()  # the DSM loss's shape: its gradient w.r.t. h is O(1)
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    assert z.grad.abs().sum() > 0


def test_variance_scaling_matches_ddpm_fan_avg_uniform():
    torch.manual_seed(0)
    weight = torch.empty(96, 64, 3, 3)
    variance_scaling_(weight, 2.0)
    fan_avg = (96 + 64) * 9 / 2
    assert weight.abs().max() <= math.sqrt(3 * 2.0 / fan_avg)
    assert weight.var().item() == pytest.approx(2.0 / fan_avg, rel=0.03)
    variance_scaling_(weight, 0.0)  # scale 0 is DDPM's 1e-10: tiny but not zero
    assert 0 < weight.abs().max() <= math.sqrt(3e-10 / fan_avg)


def test_fresh_residual_branches_are_zero_so_blocks_start_as_their_skip():
    torch.manual_seed(0)
    x, cond = torch.randn(2, 8, 8, 8), torch.randn(2, 16)
    block = ResBlock(8, 8, cond_dim=16, dropout=0.0).eval()
    assert torch.allclose(block(x, cond), x / math.sqrt(2.0), atol=1e-4)
    assert torch.allclose(block(x, cond), block(x, 10 * torch.randn(2, 16)), atol=1e-4)
    down = ResBlock(8, 8, cond_dim=16, dropout=0.0, resample="down").eval()
    skip = down.skip(nn.functional.avg_pool2d(x, 2)) / math.sqrt(2.0)
    assert torch.allclose(down(x, cond), skip, atol=1e-4) and skip.abs().max() > 0.1
    attention = SelfAttention(8).eval()
    assert torch.allclose(attention(x), x / math.sqrt(2.0), atol=1e-4)


def test_fresh_net_outputs_about_zero_whatever_its_input():
    torch.manual_seed(0)
    net = ScoreUNet(**CIFAR).eval()
    x_t, log_sigma = 5 * torch.randn(2, 3, 32, 32), torch.randn(2)
    h = net(x_t, log_sigma, torch.randn(2, 128))
    assert h.abs().max() < 1e-3
    # The same net with its near-zero layers drawn at scale 1 answers O(1): the smallness is the init's doing.
    assert perturb(net)(x_t, log_sigma, torch.randn(2, 128)).abs().max() > 0.1


@pytest.mark.parametrize("bottleneck", [True, False])
def test_latent_reaches_the_output_through_the_bottleneck(bottleneck):
    net = perturb(ScoreUNet(1, 16, LATENT, ch_mult=(1, 2), attn_resolutions=(8,), latent_bottleneck=bottleneck,
                            **TINY)).eval()
    temb_dim = net.time_embedding.dim
    with torch.no_grad():  # cut z out of every ResBlock's bias: the bottleneck is then its only way in
        for module in net.modules():
            if isinstance(module, ResBlock):
                module.cond_bias.weight[:, temb_dim:] = 0
    x_t, log_sigma, z = inputs(16)
    with torch.no_grad():
        change = (net(x_t, log_sigma, z) - net(x_t, log_sigma, z + 1.0)).abs().max().item()
    assert change > 1e-3 if bottleneck else change == 0.0


def test_bottleneck_has_the_reference_shape_and_widens_the_middle():
    on, off = ScoreUNet(**CIFAR), ScoreUNet(**CIFAR, latent_bottleneck=False)
    nf, low = 16, 4  # 32 px halved three times
    linears = [m for m in on.bottleneck if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (128, 2 * nf * low), (2 * nf * low, 2 * nf * low), (2 * nf * low, 2 * nf * low * low)]
    assert isinstance(on.bottleneck[-1], nn.SiLU)
    # The lowest map has 2nf channels, the z map another 2nf: the middle runs at 4nf and the first up block takes
    # that plus its skip.
    assert [on.mid[0].norm1.num_channels, on.mid[0].conv2.out_channels, on.mid[1].norm.num_channels,
            on.mid[2].conv2.out_channels] == [4 * nf] * 4
    assert on.up[0].norm1.num_channels == 4 * nf + 2 * nf
    assert off.mid[0].norm1.num_channels == 2 * nf and off.up[0].norm1.num_channels == 4 * nf
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(on) - count(off) > count(on.bottleneck)


def test_attention_once_per_up_level_and_after_every_down_resblock():
    net = ScoreUNet(**CIFAR)
    kinds = lambda layers: ["A" if isinstance(m, SelfAttention) else m.resample or "R" for m in layers]  # noqa: E731
    # 32 px: R R down | 16 px: R A R A down | 8 px: R R down | 4 px: R R
    assert kinds(net.down) == ["R", "R", "down", "R", "A", "R", "A", "down", "R", "R", "down", "R", "R"]
    # 4 px: R R R up | 8 px: R R R up | 16 px: R R R A up | 32 px: R R R
    assert kinds(net.up) == ["R"] * 3 + ["up"] + ["R"] * 3 + ["up"] + ["R"] * 3 + ["A", "up"] + ["R"] * 3


def test_resampling_blocks_have_a_1x1_skip_even_at_equal_widths():
    blocks = [m for m in ScoreUNet(**CIFAR).modules() if isinstance(m, ResBlock)]
    for block in blocks:
        in_channels, out_channels = block.norm1.num_channels, block.conv2.out_channels
        if block.resample or in_channels != out_channels:
            assert isinstance(block.skip, nn.Conv2d) and block.skip.kernel_size == (1, 1)
        else:
            assert isinstance(block.skip, nn.Identity)
    assert sum(block.resample is not None for block in blocks) == 6


def test_near_zero_layers_are_the_ones_that_close_a_branch():
    net = ScoreUNet(**CIFAR)
    small = {name for name, p in net.named_parameters() if name.endswith("weight") and p.dim() > 1
             and p.abs().max() < 1e-4}
    expected = {name + ".weight" for name, m in net.named_modules()
                if name.endswith((".conv2", ".proj")) or name == "head.2"}
    assert small == expected and len(expected) == 28 + 4 + 1  # 28 ResBlocks, 4 attentions, the head


def test_a_random_features_net_has_no_near_zero_layer_and_answers_its_input():
    torch.manual_seed(0)
    net = ScoreUNet(**CIFAR).eval()
    net.draw_residual_closers_()
    assert all(p.abs().max() > 1e-2 for name, p in net.named_parameters() if name.endswith("weight") and p.dim() > 1)
    x_t, log_sigma = 5 * torch.randn(2, 3, 32, 32), torch.randn(2)
    assert net(x_t, log_sigma, torch.randn(2, 128)).abs().max() > 0.1


def test_pretraining_uses_the_bottleneck_by_default():
    sizes = dict(image_channels=3, image_size=16, encoder_depth=10, widen_factor=0.25, nf=8, ch_mult=(1, 2),
                 num_res_blocks=1, attn_resolutions=(8,))
    assert PretrainModule(**sizes).score_net.bottleneck is not None
    assert PretrainModule(**sizes, latent_bottleneck=False).score_net.bottleneck is None
