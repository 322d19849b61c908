"""The noise process. The one place that knows the time convention: t in [0, 1], t = 0 clean, t = 1 most noise."""

import math

import torch


class VESDE:
    """Variance-exploding SDE: x_t = x_0 + sigma(t) * eps with sigma(t) = sigma_min * (sigma_max / sigma_min) ** t."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 1e-5) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.t_min = t_min

    def log_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """log sigma(t); the networks are conditioned on this rather than on t itself."""
        return math.log(self.sigma_min) + t * math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_sigma(t))

    def sample_time(self, batch_size: int, device: torch.device | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """t ~ U(t_min, 1), one independent draw per example."""
        u = torch.rand(batch_size, device=device, generator=generator)
        return self.t_min + (1.0 - self.t_min) * u

    def perturb(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t for given clean images, per-example times and standard-normal noise."""
        return x0 + self.sigma(t).view(-1, *([1] * (x0.dim() - 1))) * noise
