"""Small NCSN++-style score U-Net conditioned on log sigma(t) and the encoder's latent z (SPEC §4)."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from trajrep.errors import TrajrepError
from trajrep.nn.embedding import TimeEmbedding


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, max(channels // 4, 1)), channels, eps=1e-6)


class ResBlock(nn.Module):
    """BigGAN-style residual block; optional 2x up/down resampling; conditioning as a per-channel bias."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, dropout: float,
                 resample: str | None = None) -> None:
        super().__init__()
        self.resample = resample
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.cond_bias = nn.Linear(cond_dim, out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self._resample(F.silu(self.norm1(x)))
        h = self.conv1(h) + self.cond_bias(F.silu(cond))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.skip(self._resample(x)) + h) / math.sqrt(2.0)


class SelfAttention(nn.Module):
    """Single-head spatial self-attention with a rescaled residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, height * width).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        h = self.proj(h.transpose(-1, -2).reshape(b, c, height, width))
        return (x + h) / math.sqrt(2.0)


class ScoreUNet(nn.Module):
    """Returns the raw output h(x_t, sigma, z); the score is h / sigma (the caller divides, SPEC §2)."""

    def __init__(self, image_channels: int, image_size: int, latent_dim: int, nf: int = 16,
                 ch_mult: tuple[int, ...] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: tuple[int, ...] = (16,), dropout: float = 0.1,
                 latent_bottleneck: bool = False, temb_dim: int = 64) -> None:
        super().__init__()
        factor = 2 ** (len(ch_mult) - 1)
        if image_size % factor != 0:
            raise TrajrepError(
                f"the score U-Net halves the image {len(ch_mult) - 1} times (ch_mult={list(ch_mult)}), so the image "
                f"size must be a multiple of {factor}; got {image_size}. Resize or pad the images, or use a shorter "
                "ch_mult")
        cond_dim = 2 * temb_dim
        self.time_embedding = TimeEmbedding(temb_dim)
        self.latent_proj = nn.Linear(latent_dim, temb_dim)
        self.stem = nn.Conv2d(image_channels, nf, 3, padding=1)

        self.down = nn.ModuleList()
        skip_channels, channels, resolution = [nf], nf, image_size
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(self._level_block(channels, nf * mult, cond_dim, dropout,
                                                   resolution in attn_resolutions))
                channels = nf * mult
                skip_channels.append(channels)
            if level < len(ch_mult) - 1:
                self.down.append(self._level_block(channels, channels, cond_dim, dropout, False, "down"))
                resolution //= 2
                skip_channels.append(channels)

        self.bottleneck = None
        extra = 0
        if latent_bottleneck:
            self.bottleneck_size = resolution
            self.bottleneck = nn.Sequential(nn.Linear(cond_dim, cond_dim), nn.SiLU(),
                                            nn.Linear(cond_dim, 2 * nf * resolution * resolution))
            extra = 2 * nf
        self.mid = nn.ModuleList([ResBlock(channels + extra, channels, cond_dim, dropout), SelfAttention(channels),
                                  ResBlock(channels, channels, cond_dim, dropout)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(self._level_block(channels + skip_channels.pop(), nf * mult, cond_dim, dropout,
                                                 resolution in attn_resolutions))
                channels = nf * mult
            if level > 0:
                self.up.append(self._level_block(channels, channels, cond_dim, dropout, False, "up"))
                resolution *= 2
        self.head = nn.Sequential(group_norm(channels), nn.SiLU(), nn.Conv2d(channels, image_channels, 3, padding=1))

    @staticmethod
    def _level_block(in_ch: int, out_ch: int, cond_dim: int, dropout: float, attention: bool,
                     resample: str | None = None) -> nn.ModuleList:
        block = nn.ModuleList([ResBlock(in_ch, out_ch, cond_dim, dropout, resample)])
        if attention:
            block.append(SelfAttention(out_ch))
        return block

    @staticmethod
    def _run(block: nn.ModuleList, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = block[0](h, cond)
        return block[1](h) if len(block) > 1 else h

    def forward(self, x_t: torch.Tensor, log_sigma: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        cond = torch.cat([self.time_embedding(log_sigma), self.latent_proj(z)], dim=-1)
        h = self.stem(x_t)
        skips = [h]
        for block in self.down:
            h = self._run(block, h, cond)
            skips.append(h)
        if self.bottleneck is not None:
            size = self.bottleneck_size
            h = torch.cat([h, self.bottleneck(cond).view(h.shape[0], -1, size, size)], dim=1)
        h = self.mid[0](h, cond)
        h = self.mid[2](self.mid[1](h), cond)
        for block in self.up:
            if block[0].resample is None:
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(block, h, cond)
        return self.head(h)
