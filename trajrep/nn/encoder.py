"""Time-conditioned Wide-ResNet encoder E(x0, t) (method §3)."""

import torch
import torch.nn.functional as F
from torch import nn

from trajrep.errors import TrajrepError
from trajrep.nn.embedding import TimeEmbedding


def stage_widths(widen_factor: float, latent_dim: int | None = None) -> tuple[int, int, int]:
    """Channel widths of the three stages; the last one is the latent size d_z. k = 0 is the paper's 2-d latent
    (k = 2 body, 2-channel last stage); `latent_dim` generalises it: any d_z behind a body of width k, so that a small
    latent does not also shrink the encoder that chooses what goes into it."""
    if latent_dim is not None and latent_dim < 1:
        raise TrajrepError(f"latent_dim must be >= 1 (got {latent_dim}); leave it unset for 64 * widen_factor")
    if widen_factor < 0:
        raise TrajrepError(f"widen_factor must be >= 0 (got {widen_factor}); use 0 for the 2-d latent, "
                           "a fraction such as 0.125 for small latents, or 2 / 4 for the paper's CIFAR widths")
    if widen_factor == 0:
        return 32, 64, 2
    widths = tuple(int(base * widen_factor) for base in (16, 32, 64))
    if min(widths) < 1:
        raise TrajrepError(f"widen_factor {widen_factor} gives an empty stage {widths}; use widen_factor >= 0.0625")
    return widths if latent_dim is None else (*widths[:2], latent_dim)


class TimeConditionedBlock(nn.Module):
    """Pre-activation basic block with the time embedding added as a per-channel bias after the first conv."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, temb_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_bias = nn.Linear(temb_dim, out_channels)
        self.norm2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=stride, padding=1)
        self.shortcut = (nn.Conv2d(in_channels, out_channels, 1, stride=stride)
                         if stride != 1 or in_channels != out_channels else nn.Identity())

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.relu(self.norm1(x)))
        h = h + self.time_bias(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.relu(self.norm2(h)))
        return h + self.shortcut(x)


class TimeConditionedWRN(nn.Module):
    """WRN-depth-k over the clean image, conditioned on log sigma(t); output is the pooled feature or [mu, logvar].

    Global average pooling makes it accept any image size; `in_channels` is 1 or 3.
    """

    def __init__(self, in_channels: int = 3, depth: int = 28, widen_factor: float = 2.0,
                 probabilistic: bool = False, temb_dim: int = 64, latent_dim: int | None = None) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise TrajrepError(f"encoder depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        blocks_per_stage = (depth - 4) // 6
        widths = stage_widths(widen_factor, latent_dim)
        self.feature_dim = widths[-1]
        self.probabilistic = probabilistic
        self.time_embedding = TimeEmbedding(temb_dim)
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1)
        blocks, channels = [], 16
        for width, stride in zip(widths, (1, 2, 2)):
            for i in range(blocks_per_stage):
                blocks.append(TimeConditionedBlock(channels, width, stride if i == 0 else 1, temb_dim))
                channels = width
        self.blocks = nn.ModuleList(blocks)
        self.head_norm = nn.BatchNorm2d(channels)
        self.posterior = nn.Linear(channels, 2 * channels) if probabilistic else None

    def forward(self, x0: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
        """Pooled feature f (B, d) for deterministic encoders, [mu, logvar] (B, 2d) for probabilistic ones."""
        temb = self.time_embedding(log_sigma)
        h = self.stem(x0)
        for block in self.blocks:
            h = block(h, temb)
        f = F.relu(self.head_norm(h)).mean(dim=(2, 3))
        return self.posterior(f) if self.posterior is not None else f

    def representation(self, x0: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
        """What downstream probes read: f, or the posterior mean mu (method §6)."""
        out = self(x0, log_sigma)
        return out[:, : self.feature_dim]
