"""Mutual information between representations by MINE (Belghazi et al., 2018), as method §9 specifies.

The statistics network T(x, z) (concat -> 256 -> ELU -> 256 -> ELU -> 1) is trained to maximise the
Donsker-Varadhan bound I(X; Z) >= E_joint[T] - log E_marginal[exp T], with the marginal drawn by pairing x with a
z of another example. The gradient of the log term is bias-corrected with a moving average (0.99) of E[exp T]
in the denominator. The estimate is the mean of the bound over the last `window` steps.

Many pairs (x, z) are estimated at once by independent networks stacked into batched matmuls: one step serves
all 66 pairs of times of an 11 x 11 NMI map (one matmul per layer, one progress bar) instead of 66 loops of small
ones. Every pair starts from the same seeded weights and sees the same batch rows, so each estimate is the one
its pair would get alone, up to float rounding. The networks train on the device of the samples.
"""

import math

import torch
from torch import Tensor, nn

from trajrep.progress import Ticker


class StatisticsNetwork(nn.Sequential):
    def __init__(self, in_features: int, hidden: int = 256) -> None:
        super().__init__(nn.Linear(in_features, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU(),
                         nn.Linear(hidden, 1))


class StackedStatisticsNetworks(nn.Module):
    """`copies` independent statistics networks, all initialised as one seeded StatisticsNetwork, applied to
    inputs (copies, B, in_features) -> (copies, B)."""

    def __init__(self, in_features: int, copies: int, seed: int, hidden: int = 256) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            template = StatisticsNetwork(in_features, hidden)
        linears = [layer for layer in template if isinstance(layer, nn.Linear)]
        self.weights = nn.ParameterList(
            [nn.Parameter(layer.weight.detach().T.expand(copies, -1, -1).clone()) for layer in linears])
        self.biases = nn.ParameterList(
            [nn.Parameter(layer.bias.detach().expand(copies, 1, -1).clone()) for layer in linears])

    def forward(self, inputs: Tensor) -> Tensor:
        hidden = inputs
        for index, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            hidden = torch.baddbmm(bias, hidden, weight)
            if index < len(self.weights) - 1:
                hidden = nn.functional.elu(hidden)
        return hidden.squeeze(-1)


def mine_pairs(xs: Tensor, zs: Tensor, steps: int = 4000, batch_size: int = 256, lr: float = 1e-4,
               ema_decay: float = 0.99, window: int = 100, seed: int = 0, hidden: int = 256,
               progress: bool = False) -> Tensor:
    """Estimate I(x_p; z_p) in nats for P pairs of paired samples xs (P, N, dx) and zs (P, N, dz) -> (P,);
    `hidden` is the statistics networks' width (method §9's 256; narrower ones suit low-dimensional checks)."""
    if xs.ndim != 3 or zs.ndim != 3 or xs.shape[:2] != zs.shape[:2] or xs.shape[1] < 2:
        raise ValueError(f"need P pairs of N >= 2 paired samples, (P, N, dx) and (P, N, dz): got x of shape "
                         f"{tuple(xs.shape)} and z of shape {tuple(zs.shape)}")
    pairs, examples = xs.shape[:2]
    generator = torch.Generator().manual_seed(seed)
    networks = StackedStatisticsNetworks(xs.shape[2] + zs.shape[2], pairs, seed, hidden).to(xs.device)
    optimizer = torch.optim.Adam(networks.parameters(), lr=lr)
    xs, zs = xs.float(), zs.float()
    moving_exp, bounds = None, []
    ticker = Ticker(f"MINE ({pairs} pairs, seed {seed}), step", steps) if progress else None
    for step in range(steps):
        rows = torch.randint(examples, (batch_size,), generator=generator).to(xs.device)
        others = torch.randint(examples, (batch_size,), generator=generator).to(xs.device)
        x_rows = xs[:, rows]
        joint = networks(torch.cat([x_rows, zs[:, rows]], dim=2)).mean(dim=1)
        marginal = networks(torch.cat([x_rows, zs[:, others]], dim=2))
        mean_exp = marginal.exp().mean(dim=1)
        moving_exp = mean_exp.detach() if moving_exp is None else (
            ema_decay * moving_exp + (1 - ema_decay) * mean_exp.detach())
        optimizer.zero_grad()
        # grad of log E[e^T] ~ grad E[e^T] / moving average; the pairs' networks are independent, so their sum
        # gives each network its own gradient.
        (-(joint - mean_exp / moving_exp)).sum().backward()
        optimizer.step()
        bounds.append((joint - (torch.logsumexp(marginal, dim=1) - math.log(batch_size))).detach())
        if ticker is not None:
            ticker.tick(step + 1, lambda: f"mean bound {bounds[-1].mean().item():.3g} nats")
    return torch.stack(bounds[-window:]).mean(dim=0).cpu()


def mine(x: Tensor, z: Tensor, **options) -> float:
    """Estimate I(x; z) in nats from paired samples x (N, dx) and z (N, dz); options as for `mine_pairs`."""
    if len(x) != len(z) or len(x) < 2:
        raise ValueError(f"need paired samples: got {len(x)} x and {len(z)} z")
    return mine_pairs(x[None], z[None], **options).item()


def time_nmi(representations: Tensor, seeds: list[int], progress: bool = False, **mine_options) -> Tensor:
    """(T, T) normalised mutual information between the representations at every two times, NMI_ij =
    I_ij / sqrt(I_ii I_jj), from representations (N, T, d); each I is a MINE estimate averaged over `seeds`.
    I_ii is the estimator's (finite) value for a representation with itself, as in the paper. Estimates are
    clamped at 0 (MI is never negative); a time without detectable self-information gets NMI 0."""
    num_times = representations.shape[1]
    first, second = torch.triu_indices(num_times, num_times)
    by_time = representations.transpose(0, 1)  # (T, N, d)
    estimates = torch.stack([mine_pairs(by_time[first], by_time[second], seed=seed, progress=progress,
                                        **mine_options) for seed in seeds]).mean(dim=0)
    information = torch.zeros(num_times, num_times)
    information[first, second] = information[second, first] = estimates
    information.clamp_min_(0.0)  # a negative bound means no detectable information
    diagonal = information.diagonal()
    scale = (diagonal[:, None] * diagonal[None, :]).sqrt()
    return torch.where(scale > 0, information / scale.clamp_min(1e-12), torch.zeros_like(information))
