import math

import pytest
import torch
from torch import nn

from trajrep.diffusion import VESDE
from trajrep.errors import TrajrepError
from trajrep.nn.encoder import TimeConditionedWRN, stage_widths
from trajrep.nn.unet import ScoreUNet
from trajrep.pretrain.module import PretrainModule, dsm_loss, gaussian_kl

TINY = dict(image_channels=3, image_size=16, encoder_depth=10, widen_factor=0.25, nf=8, ch_mult=(1, 2),
            num_res_blocks=1, attn_resolutions=(8,), warmup_steps=1)


def test_sigma_follows_the_ve_schedule():
    sde = VESDE(0.01, 50.0)
    t = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(sde.sigma(t), torch.tensor([0.01, math.sqrt(0.01 * 50.0), 50.0]))


def test_dsm_loss_matches_hand_computation():
    h = torch.tensor([[[[1.0, -2.0]]]])
    eps = torch.tensor([[[[0.5, 0.5]]]])
    # 0.5 * ((1 + 0.5)^2 + (-2 + 0.5)^2) = 0.5 * (2.25 + 2.25)
    assert dsm_loss(h, eps).item() == pytest.approx(2.25)


class PerfectDenoiserUpToScale(nn.Module):
    """h = x0_hat - x_t with x0_hat = 0: the loss is then 0.5 * sum((eps - x_t)^2), known in closed form."""

    def forward(self, x_t, log_sigma, z):
        return -x_t


def test_loss_terms_wire_sigma_and_noise_as_specified():
    torch.manual_seed(0)
    module = PretrainModule(mode="noreg-drl", **TINY)
    module.score_net = PerfectDenoiserUpToScale()
    x0 = torch.rand(2, 3, 16, 16)
    noise = torch.randn_like(x0)
    t = torch.tensor([0.1, 0.9])
    terms = module.loss_terms(x0, t, noise)
    sigma = 0.01 * 5000.0 ** t
    x_t = x0 + sigma.view(-1, 1, 1, 1) * noise
    expected = 0.5 * ((noise - x_t) ** 2).sum(dim=(1, 2, 3))
    assert torch.allclose(terms["dsm"], expected, rtol=1e-5)
    assert torch.equal(terms["reg"], torch.zeros(2))


def test_kl_matches_closed_form():
    mu = torch.tensor([[1.0, -1.0]])
    logvar = torch.tensor([[0.0, math.log(4.0)]])
    # per dim: 0.5 * (mu^2 + var - 1 - log var)
    expected = 0.5 * (1 + 1 - 1 - 0) + 0.5 * (1 + 4 - 1 - math.log(4.0))
    assert gaussian_kl(mu, logvar).item() == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["probabilistic-drl", "reg-drl"])
def test_regulariser_matches_its_formula(mode):
    torch.manual_seed(0)
    module = PretrainModule(mode=mode, **TINY).eval()
    x0, t = torch.rand(4, 3, 16, 16), torch.rand(4)
    out = module.encoder(x0, module.sde.log_sigma(t))
    _, reg = module.encode(x0, t)
    if mode == "reg-drl":
        assert torch.allclose(reg, out.abs().sum(dim=1))
    else:
        mu, logvar = out.chunk(2, dim=1)
        assert torch.allclose(reg, gaussian_kl(mu, logvar))


def test_encoder_output_depends_on_t():
    torch.manual_seed(0)
    encoder = TimeConditionedWRN(3, depth=10, widen_factor=0.25).eval()
    x0 = torch.rand(4, 3, 16, 16)
    f0 = encoder(x0, torch.full((4,), math.log(0.01)))
    f1 = encoder(x0, torch.full((4,), math.log(50.0)))
    assert f0.shape == (4, 16)
    assert not torch.allclose(f0, f1)


@pytest.mark.parametrize("size,channels", [(16, 1), (28, 3), (40, 3)])
def test_encoder_accepts_any_size_and_one_or_three_channels(size, channels):
    encoder = TimeConditionedWRN(channels, depth=10, widen_factor=0.125)
    assert encoder(torch.rand(2, channels, size, size), torch.zeros(2)).shape == (2, 8)


def test_widen_factor_zero_gives_two_dimensional_latent_and_negative_is_rejected():
    assert stage_widths(0) == (32, 64, 2)
    assert stage_widths(2) == (32, 64, 128)
    with pytest.raises(TrajrepError, match="widen_factor must be >= 0"):
        stage_widths(-1)


def test_latent_dim_sets_only_the_last_stage_and_the_score_net_reads_it():
    assert stage_widths(0.5, latent_dim=8) == (8, 16, 8)
    assert stage_widths(2, latent_dim=2) == stage_widths(0)  # the paper's 2-d latent, spelled out
    model = PretrainModule(**{**TINY, "latent_dim": 3, "mode": "probabilistic-drl"})
    assert model.latent_dim == 3 and model.score_net.latent_proj.in_features == 3
    x0 = torch.rand(2, 3, 16, 16)
    assert model.encoder.representation(x0, torch.zeros(2)).shape == (2, 3)
    with pytest.raises(TrajrepError, match="latent_dim must be >= 1"):
        stage_widths(0.5, latent_dim=0)


def test_unet_rejects_image_size_it_cannot_halve():
    with pytest.raises(TrajrepError, match="multiple of 8"):
        ScoreUNet(3, 28, latent_dim=4, ch_mult=(1, 2, 2, 2))


def test_unknown_mode_is_rejected():
    with pytest.raises(TrajrepError, match="unknown encoder mode"):
        PretrainModule(mode="vae", **TINY)


def test_deterministic_modes_build_no_posterior_head():
    assert PretrainModule(mode="reg-drl", **TINY).encoder.posterior is None
    assert PretrainModule(mode="probabilistic-drl", **TINY).encoder.posterior is not None


@pytest.mark.parametrize("mode", ["reg-drl", "score-only"])
def test_training_loss_falls_on_synthetic_data(mode):
    """60 Adam steps of a tiny model on fixed-colour squares must reduce the DSM loss clearly (score-only: the
    score net alone, a plain diffusion model)."""
    torch.manual_seed(0)
    module = PretrainModule(mode=mode, **TINY)
    optimizer = torch.optim.Adam(module.parameters(), lr=4e-3)
    images = torch.zeros(64, 3, 16, 16)
    images[:, 0, 4:12, 4:12] = 1.0
    generator = torch.Generator().manual_seed(1)

    def batch_loss():
        x0 = images[torch.randint(0, 64, (16,), generator=generator)]
        t = module.sde.sample_time(16, generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        terms = module.loss_terms(x0, t, noise)
        return (terms["dsm"] + 1e-5 * terms["reg"]).mean()

    with torch.no_grad():
        start = sum(batch_loss().item() for _ in range(8)) / 8
    for _ in range(60):
        optimizer.zero_grad()
        batch_loss().backward()
        optimizer.step()
    with torch.no_grad():
        end = sum(batch_loss().item() for _ in range(8)) / 8
    assert end < 0.5 * start, (start, end)
