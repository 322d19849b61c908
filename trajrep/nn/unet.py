"""Small NCSN++-style score U-Net conditioned on log sigma(t) and the encoder's latent z (method §4).

Shaped and initialised like the reference's NCSN++ ("biggan" blocks, no input pyramid): the layers that close a
residual branch start near zero, so a fresh block is its skip path and the fresh net outputs about 0.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from trajrep.errors import TrajrepError
from trajrep.nn.embedding import TimeEmbedding


def variance_scaling_(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """DDPM's init, in place: uniform with variance scale / mean(fan_in, fan_out); scale 0 stands for 1e-10, a
    near-zero layer that still receives gradients."""
    receptive = weight[0][0].numel() if weight.dim() > 2 else 1
    fan_avg = (weight.shape[0] + weight.shape[1]) * receptive / 2
    bound = math.sqrt(3.0 * (scale or 1e-10) / fan_avg)
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


def _init(layer: nn.Conv2d | nn.Linear, scale: float = 1.0) -> nn.Conv2d | nn.Linear:
    variance_scaling_(layer.weight, scale)
    nn.init.zeros_(layer.bias)
    return layer


def conv(in_channels: int, out_channels: int, kernel: int = 3, scale: float = 1.0) -> nn.Conv2d:
    return _init(nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2), scale)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, max(channels // 4, 1)), channels, eps=1e-6)


class ResBlock(nn.Module):
    """BigGAN-style residual block; optional 2x up/down resampling; conditioning as a per-channel bias."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, dropout: float,
                 resample: str | None = None) -> None:
        super().__init__()
        self.resample = resample
        self.norm1 = group_norm(in_channels)
        self.conv1 = conv(in_channels, out_channels)
        self.cond_bias = _init(nn.Linear(cond_dim, out_channels))
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv(out_channels, out_channels, scale=0.0)
        # The reference gives a resampling block a learnt skip even at equal widths.
        self.skip = (conv(in_channels, out_channels, kernel=1) if in_channels != out_channels or resample
                     else nn.Identity())

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
        for part in self.qkv.weight.data.chunk(3):  # q, k and v each as the reference's separate 1x1 layers
            variance_scaling_(part, 0.1)
        nn.init.zeros_(self.qkv.bias)
        self.proj = conv(channels, channels, kernel=1, scale=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, height * width).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        h = self.proj(h.transpose(-1, -2).reshape(b, c, height, width))
        return (x + h) / math.sqrt(2.0)


class ScoreUNet(nn.Module):
    """Returns the raw output h(x_t, sigma, z); the score is h / sigma (the caller divides, method §2).
    With `latent_dim` 0 it is a plain (unconditional) diffusion model: no z, conditioned on sigma alone.

    `latent_bottleneck` also injects the conditioning vector at the lowest resolution L, as the reference does: an
    MLP maps it to a 2nf x L x L map concatenated to the lowest feature map, so the middle blocks run 2nf wider.
    """

    def __init__(self, image_channels: int, image_size: int, latent_dim: int, nf: int = 16,
                 ch_mult: tuple[int, ...] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: tuple[int, ...] = (16,), dropout: float = 0.1,
                 latent_bottleneck: bool = True, temb_dim: int = 64) -> None:
        super().__init__()
        factor = 2 ** (len(ch_mult) - 1)
        if image_size % factor != 0:
            raise TrajrepError(
                f"the score U-Net halves the image {len(ch_mult) - 1} times (ch_mult={list(ch_mult)}), so the image "
                f"size must be a multiple of {factor}; got {image_size}. Resize or pad the images, or use a shorter "
                "ch_mult")
        cond_dim = 2 * temb_dim if latent_dim else temb_dim
        self.time_embedding = TimeEmbedding(temb_dim)
        for layer in self.time_embedding.mlp:
            if isinstance(layer, nn.Linear):
                _init(layer)
        # PyTorch's default init, as the reference
        self.latent_proj = nn.Linear(latent_dim, temb_dim) if latent_dim else None
        self.stem = conv(image_channels, nf)

        # Down: attention after every ResBlock at an attention resolution; each entry's output is a skip.
        self.down = nn.ModuleList()
        skip_channels, channels, resolution = [nf], nf, image_size
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(channels, nf * mult, cond_dim, dropout))
                channels = nf * mult
                if resolution in attn_resolutions:
                    self.down.append(SelfAttention(channels))
                skip_channels.append(channels)
            if level < len(ch_mult) - 1:
                self.down.append(ResBlock(channels, channels, cond_dim, dropout, "down"))
                resolution //= 2
                skip_channels.append(channels)

        self.bottleneck = None
        if latent_bottleneck:
            self.bottleneck_size = resolution
            width = 2 * nf * resolution
            self.bottleneck = nn.Sequential(  # PyTorch's default init, as the reference
                nn.Linear(cond_dim, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                nn.Linear(width, width * resolution), nn.SiLU())
            channels += 2 * nf
        self.mid = nn.ModuleList([ResBlock(channels, channels, cond_dim, dropout), SelfAttention(channels),
                                  ResBlock(channels, channels, cond_dim, dropout)])

        # Up: one attention per level, after the level's last ResBlock.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(channels + skip_channels.pop(), nf * mult, cond_dim, dropout))
                channels = nf * mult
            if resolution in attn_resolutions:
                self.up.append(SelfAttention(channels))
            if level > 0:
                self.up.append(ResBlock(channels, channels, cond_dim, dropout, "up"))
                resolution *= 2
        self.head = nn.Sequential(group_norm(channels), nn.SiLU(), conv(channels, image_channels, scale=0.0))

    def draw_residual_closers_(self) -> None:
        """Draw the layers that start near zero (each residual branch's last layer, and the output layer) at DDPM's
        scale 1, as every other layer. An untrained net read as a random-features control is then a random
        nonlinear function of x_t; as initialised for training, each block is only its near-linear skip path."""
        for module in self.modules():
            if isinstance(module, ResBlock):
                variance_scaling_(module.conv2.weight)
            elif isinstance(module, SelfAttention):
                variance_scaling_(module.proj.weight)
        variance_scaling_(self.head[-1].weight)

    def forward(self, x_t: torch.Tensor, log_sigma: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        cond = self.time_embedding(log_sigma)
        if self.latent_proj is not None:
            cond = torch.cat([cond, self.latent_proj(z)], dim=-1)
        h = self.stem(x_t)
        skips = [h]
        for layer in self.down:
            if isinstance(layer, SelfAttention):
                h = skips[-1] = layer(h)  # refines the skip of the ResBlock it follows
            else:
                h = layer(h, cond)
                skips.append(h)
        if self.bottleneck is not None:
            size = self.bottleneck_size
            h = torch.cat([h, self.bottleneck(cond).view(h.shape[0], -1, size, size)], dim=1)
        h = self.mid[0](h, cond)
        h = self.mid[2](self.mid[1](h), cond)
        for layer in self.up:
            if isinstance(layer, SelfAttention):
                h = layer(h)
                continue
            if layer.resample is None:
                h = torch.cat([h, skips.pop()], dim=1)
            h = layer(h, cond)
        return self.head(h)
