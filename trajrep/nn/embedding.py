"""Time embedding shared by the encoder and the score network."""

import math

import torch
from torch import nn


class GaussianFourierFeatures(nn.Module):
    """Fixed random Fourier features of a scalar: [sin(2 pi w s), cos(2 pi w s)], w ~ N(0, scale^2)."""

    def __init__(self, num_frequencies: int = 16, scale: float = 16.0) -> None:
        super().__init__()
        self.register_buffer("frequencies", torch.randn(num_frequencies) * scale)

    @property
    def out_dim(self) -> int:
        return 2 * self.frequencies.numel()

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        angles = 2 * math.pi * s[:, None] * self.frequencies[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class TimeEmbedding(nn.Module):
    """log sigma(t) -> Fourier features (16 frequencies, scale 16) -> Linear -> SiLU -> Linear, as method §3-4."""

    def __init__(self, dim: int = 64, num_frequencies: int = 16, scale: float = 16.0) -> None:
        super().__init__()
        self.fourier = GaussianFourierFeatures(num_frequencies, scale)
        self.mlp = nn.Sequential(nn.Linear(self.fourier.out_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.dim = dim

    def forward(self, log_sigma: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.fourier(log_sigma))
