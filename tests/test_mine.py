"""MINE recovers the mutual information of correlated Gaussians, I = -d/2 log(1 - rho^2), within 10 %."""

import math

import pytest
import torch

from trajrep.mine import mine


@pytest.mark.parametrize("rho, dim", [(0.8, 2), (0.5, 4)])
def test_mine_matches_the_analytic_mutual_information_of_gaussians(rho, dim):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(20000, dim, generator=generator)
    z = rho * x + math.sqrt(1 - rho ** 2) * torch.randn(20000, dim, generator=generator)
    analytic = -dim / 2 * math.log(1 - rho ** 2)
    assert mine(x, z) == pytest.approx(analytic, rel=0.10)


def test_mine_finds_no_information_between_independent_variables():
    generator = torch.Generator().manual_seed(2)
    x, z = torch.randn(20000, 2, generator=generator), torch.randn(20000, 2, generator=generator)
    assert abs(mine(x, z, steps=1500)) < 0.05
