"""MINE recovers the mutual information of correlated Gaussians, I = -d/2 log(1 - rho^2), within 10 %."""

import math

import pytest
import torch

from trajrep.analysis.mi import mine, mine_pairs, time_nmi


@pytest.mark.parametrize("rho, dim", [(0.8, 2), (0.5, 4)])
def test_mine_matches_the_analytic_mutual_information_of_gaussians(rho, dim):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(20000, dim, generator=generator)
    z = rho * x + math.sqrt(1 - rho ** 2) * torch.randn(20000, dim, generator=generator)
    analytic = -dim / 2 * math.log(1 - rho ** 2)
    assert mine(x, z, steps=1500, lr=1e-3, hidden=64) == pytest.approx(analytic, rel=0.10)


def test_mine_finds_no_information_between_independent_variables():
    generator = torch.Generator().manual_seed(2)
    x, z = torch.randn(20000, 2, generator=generator), torch.randn(20000, 2, generator=generator)
    assert abs(mine(x, z, steps=1500, hidden=64)) < 0.05


def test_stacked_pairs_get_the_estimates_they_would_get_alone():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2000, 2, generator=generator)
    z = torch.tensor([0.0, 0.6, 0.95])[:, None, None] * x + 0.5 * torch.randn(3, 2000, 2, generator=generator)
    stacked = mine_pairs(x, z, steps=150, lr=1e-3)
    alone = torch.tensor([mine(x[pair], z[pair], steps=150, lr=1e-3) for pair in range(3)])
    torch.testing.assert_close(stacked, alone, rtol=1e-4, atol=1e-4)
    assert stacked[0] < stacked[1] < stacked[2]  # more correlation, more information: the pairs stayed apart


@pytest.mark.slow
def test_time_nmi_is_high_between_dependent_times_and_near_zero_otherwise():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 2, generator=generator)
    noisy = x + 0.3 * torch.randn(5000, 2, generator=generator)
    unrelated = torch.randn(5000, 2, generator=generator)
    nmi = time_nmi(torch.stack([x, noisy, unrelated], dim=1), seeds=[0], steps=1500, lr=1e-3, hidden=64)
    assert torch.allclose(nmi, nmi.T) and torch.allclose(nmi.diagonal(), torch.ones(3))
    assert nmi[0, 1] > 0.4 and nmi[0, 2] < 0.1 and nmi[1, 2] < 0.1
