"""Mutual information between representations by MINE (Belghazi et al., 2018), as SPEC §9 specifies.

The statistics network T(x, z) (concat -> 256 -> ELU -> 256 -> ELU -> 1) is trained to maximise the
Donsker-Varadhan bound I(X; Z) >= E_joint[T] - log E_marginal[exp T], with the marginal drawn by pairing x with a
z of another example. The gradient of the log term is bias-corrected with a moving average (0.99) of E[exp T]
in the denominator. The estimate is the mean of the bound over the last `window` steps.
"""

import math

import torch
from torch import Tensor, nn


class StatisticsNetwork(nn.Sequential):
    def __init__(self, in_features: int, hidden: int = 256) -> None:
        super().__init__(nn.Linear(in_features, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU(),
                         nn.Linear(hidden, 1))


def mine(x: Tensor, z: Tensor, steps: int = 4000, batch_size: int = 256, lr: float = 1e-4,
         ema_decay: float = 0.99, window: int = 100, seed: int = 0) -> float:
    """Estimate I(x; z) in nats from paired samples x (N, dx) and z (N, dz)."""
    if len(x) != len(z) or len(x) < 2:
        raise ValueError(f"need paired samples: got {len(x)} x and {len(z)} z")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = StatisticsNetwork(x.shape[1] + z.shape[1])
    optimizer = torch.optim.Adam(network.parameters(), lr=lr)
    x, z = x.float(), z.float()
    moving_exp, bounds = None, []
    for _ in range(steps):
        rows = torch.randint(len(x), (batch_size,), generator=generator)
        others = torch.randint(len(x), (batch_size,), generator=generator)
        joint = network(torch.cat([x[rows], z[rows]], dim=1)).mean()
        marginal = network(torch.cat([x[rows], z[others]], dim=1)).squeeze(1)
        mean_exp = marginal.exp().mean()
        moving_exp = mean_exp.detach() if moving_exp is None else (
            ema_decay * moving_exp + (1 - ema_decay) * mean_exp.detach())
        optimizer.zero_grad()
        (-(joint - mean_exp / moving_exp)).backward()  # grad of log E[e^T] ~ grad E[e^T] / moving average
        optimizer.step()
        bounds.append((joint - (torch.logsumexp(marginal, dim=0) - math.log(batch_size))).item())
    return sum(bounds[-window:]) / len(bounds[-window:])


def time_nmi(representations: Tensor, seeds: list[int], **mine_options) -> Tensor:
    """(T, T) normalised mutual information between the representations at every two times, NMI_ij =
    I_ij / sqrt(I_ii I_jj), from representations (N, T, d); each I is a MINE estimate averaged over `seeds`.
    I_ii is the estimator's (finite) value for a representation with itself, as in the paper. Estimates are
    clamped at 0 (MI is never negative); a time without detectable self-information gets NMI 0."""
    num_times = representations.shape[1]
    information = torch.zeros(num_times, num_times)
    for i in range(num_times):
        for j in range(i, num_times):
            estimates = [mine(representations[:, i], representations[:, j], seed=seed, **mine_options)
                         for seed in seeds]
            information[i, j] = information[j, i] = sum(estimates) / len(estimates)
    information.clamp_min_(0.0)  # a negative bound means no detectable information
    diagonal = information.diagonal()
    scale = (diagonal[:, None] * diagonal[None, :]).sqrt()
    return torch.where(scale > 0, information / scale.clamp_min(1e-12), torch.zeros_like(information))
