"""Denoiser features: the representation t -> phi_block(x_t, t) of any diffusion model, read by forward hooks.

DDAE probes a diffusion model's denoiser at ONE noise level and ONE block; here every t of a grid (and every block
asked for) is kept, so the probes and mixers read the whole trajectory. For each image and each t, x_t is drawn
from the backbone's own forward process with noise from a generator seeded by (noise seed, image index, t index,
draw): a cache is the same on any number of processes and for any batch size. A block's output is averaged over
space (global average pooling) and over `draws` noise draws.

Backbones: trajrep's own score U-Net (a score-only model, or a DRL model's score net with the latent set to zero)
and a `diffusers` UNet2DModel saved with its DDPM scheduler (`pip install trajrep[diffusers]`), whose timesteps
are trajrep's t in [0, 1] scaled to the scheduler's range: timestep = round(t * (num_train_timesteps - 1)), so
t = 0 is the least noisy step and t = 1 the noisiest, as trajrep's own t.
"""

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from trajrep.data.base import ImageDataModule
from trajrep.data.identity import (DIFFUSERS_MODEL, DIFFUSERS_SCHEDULER, ddpm_timesteps, denoiser_identity,
                                   diffusers_backbone, diffusers_folders, refuse_ema_of_a_folder,
                                   trajrep_backbone)
from trajrep.errors import TrajrepError
from trajrep.extract import SPLITS, ExtractionData, full_precision, load_pretrained_model, write_cache
from trajrep.pretrain.module import PretrainModule


class Backbone(ABC):
    """What denoiser features need of a diffusion model: its network (hooks attach to its blocks), its input
    scaling, its forward process and one denoising call."""

    network: nn.Module

    @abstractmethod
    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 images -> the network's input range."""

    @abstractmethod
    def noisy(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t of the backbone's forward process at trajrep times t in [0, 1]."""

    @abstractmethod
    def denoise(self, x_t: torch.Tensor, t: torch.Tensor) -> Any:
        """One call of the network on x_t (the output is not used: the hooks read the blocks)."""

    @abstractmethod
    def describe(self, times: list[float]) -> dict:
        """What the backbone is and how it maps `times` to its noise levels (for the cache and the records)."""

    @abstractmethod
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) the network was built for."""


class TrajrepBackbone(Backbone):
    """trajrep's score U-Net: the VE SDE's x_t = x0 + sigma(t) eps, conditioned on log sigma(t); a DRL model's
    latent is set to zero (its score net is then read as a plain denoiser)."""

    def __init__(self, model: PretrainModule, images: ImageDataModule | None = None) -> None:
        self.model, self.network, self.images = model, model.score_net, images

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        if self.images is None:
            raise TrajrepError("a trajrep backbone normalises images as its pretraining data did; give the image "
                               "datamodule")
        return self.images.normalize(images_uint8)

    def noisy(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.model.sde.perturb(x0, t, noise)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor) -> Any:
        latent = self.model.latent_dim
        z = torch.zeros(x_t.shape[0], latent, device=x_t.device, dtype=x_t.dtype) if latent else None
        return self.network(x_t, self.model.sde.log_sigma(t), z)

    def describe(self, times: list[float]) -> dict:
        sde = self.model.sde
        return trajrep_backbone(self.network.state_dict(), self.model.hparams.mode, (sde.sigma_min, sde.sigma_max),
                                times)

    def image_shape(self) -> tuple[int, int, int]:
        size = self.model.hparams.image_size
        return self.model.hparams.image_channels, size, size


class DiffusersBackbone(Backbone):
    """A diffusers UNet2DModel with its DDPM scheduler: x_t = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps at the
    timestep k = round(t * (num_train_timesteps - 1)); images scaled to [-1, 1] as DDPM trains on them."""

    def __init__(self, unet: nn.Module, scheduler: Any, source: str) -> None:
        self.network, self.scheduler, self.source = unet, scheduler, source

    def timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return ddpm_timesteps(t, self.scheduler.config.num_train_timesteps)

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return images_uint8.float() / 127.5 - 1.0

    def noisy(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, self.timesteps(t).to(x0.device))

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor) -> Any:
        return self.network(x_t, self.timesteps(t).to(x_t.device))

    def describe(self, times: list[float]) -> dict:
        return diffusers_backbone(Path(self.source), times)  # from its files, as the probe side reads it

    def image_shape(self) -> tuple[int, int, int]:
        config = self.network.config
        size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
        return config.in_channels, size, size


def load_backbone(path: str | Path, ema: bool = False, images: ImageDataModule | None = None) -> Backbone:
    """A trajrep checkpoint (a .ckpt file) or a diffusers model folder (UNet2DModel and its scheduler, as
    `save_pretrained` writes them: config.json at the top or in unet/, scheduler_config.json at the top or in
    scheduler/)."""
    path = Path(path)
    if path.is_file():
        return TrajrepBackbone(load_pretrained_model(path, ema), images)
    if not path.is_dir():
        raise TrajrepError(f"backbone {path} does not exist; give a trajrep checkpoint (.ckpt) or a diffusers model "
                           "folder (e.g. google/ddpm-cifar10-32 downloaded with huggingface-cli)")
    refuse_ema_of_a_folder(ema)
    try:
        import diffusers
    except ImportError:
        raise TrajrepError("a diffusers backbone needs the diffusers package: pip install 'trajrep[diffusers]'"
                           ) from None
    model_dir, scheduler_dir = diffusers_folders(path)
    unet = getattr(diffusers, DIFFUSERS_MODEL).from_pretrained(model_dir).eval()
    return DiffusersBackbone(unet, getattr(diffusers, DIFFUSERS_SCHEDULER).from_pretrained(scheduler_dir), str(path))


def noise_seed_of(noise_seed: int, split: str, index: int, time_index: int, draw: int) -> int:
    """The generator seed of one image's noise at one t and draw: a hash, so no two (split, index, t, draw) share
    it. The split is in it so that test image i and training image i do not share their noise (a kNN probe would
    find its noise twin at high t)."""
    digest = hashlib.blake2b(f"{noise_seed}:{split}:{index}:{time_index}:{draw}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def draw_noise(split: str, indices: torch.Tensor, time_index: int, draw: int, noise_seed: int,
               shape: tuple[int, ...]) -> torch.Tensor:
    """(B, *shape) standard normal noise, each row from its own (noise seed, split, image index, t, draw)
    generator."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(
        noise_seed_of(noise_seed, split, int(index), time_index, draw))) for index in indices.tolist()])


def first_tensor(output: Any) -> Any:
    """What a block returned, as one tensor: diffusers' down blocks return (features, skips), its models an
    output object with `.sample`."""
    return output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)


def pooled(output: Any) -> torch.Tensor:
    """A block's output averaged over its spatial axes: (B, C)."""
    tensor = first_tensor(output).float()
    return tensor.mean(dim=tuple(range(2, tensor.dim()))) if tensor.dim() > 2 else tensor


class BlockOutputs:
    """Forward hooks on named blocks of a network; `taken` holds each block's pooled output of the last call."""

    def __init__(self, network: nn.Module, blocks: list[str]) -> None:
        modules = dict(network.named_modules())
        unknown = [name for name in blocks if name not in modules]
        if unknown:
            raise TrajrepError(f"the backbone has no block(s) {', '.join(unknown)}; list them with "
                               "`trajrep extract --list_layers true --backbone ...` (e.g. "
                               f"{', '.join(list(feature_blocks(network))[:4])})")
        self.taken: dict[str, torch.Tensor] = {}
        self.handles = [modules[name].register_forward_hook(self._taker(name)) for name in blocks]

    def _taker(self, name: str) -> Callable:
        def take(module: nn.Module, inputs: Any, output: Any) -> None:
            self.taken[name] = pooled(output)
        return take

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def feature_blocks(network: nn.Module) -> dict[str, nn.Module]:
    """The candidate blocks of a network: its modules at depth 1 or 2 of the name (`down.3`, `mid_block`,
    `up_blocks.1`) that are not plain containers."""
    return {name: module for name, module in network.named_modules()
            if name and name.count(".") <= 1 and not isinstance(module, (nn.ModuleList, nn.ModuleDict))}


@torch.no_grad()
def list_layers(backbone: Backbone) -> list[tuple[str, tuple[int, ...]]]:
    """(block name, output shape of one image) of every candidate block whose output is a feature map, in the
    order a forward pass reaches them: what `blocks` may name."""
    shapes: dict[str, tuple[int, ...]] = {}
    def record(name: str) -> Callable:
        def shape(module: nn.Module, inputs: Any, output: Any) -> None:
            tensor = first_tensor(output)
            shapes.setdefault(name, tuple(tensor.shape[1:]) if isinstance(tensor, torch.Tensor) else ())
        return shape

    hooks = [module.register_forward_hook(record(name)) for name, module in feature_blocks(backbone.network).items()]
    try:
        parameter = next(backbone.network.parameters())
        x = torch.zeros(1, *backbone.image_shape(), device=parameter.device)
        backbone.denoise(x, torch.full((1,), 0.5, device=x.device))
    finally:
        for hook in hooks:
            hook.remove()
    return [(name, shape) for name, shape in shapes.items() if len(shape) == 3]


def block_widths(backbone: Backbone, blocks: list[str]) -> list[int]:
    """The channels of each named block's output: a cache's width per layer."""
    if not blocks or len(set(blocks)) != len(blocks):
        raise TrajrepError(f"blocks must name one or more distinct blocks of the backbone, got {blocks}")
    shapes = dict(list_layers(backbone))
    unknown = [name for name in blocks if name not in shapes]
    if unknown:
        raise TrajrepError(f"the backbone has no feature-map block(s) {', '.join(unknown)}; its blocks are "
                           f"{', '.join(shapes)} (`trajrep extract --list_layers true` prints their shapes)")
    return [shapes[name][0] for name in blocks]


def extract_denoiser_features(trainer: pl.Trainer, backbone: Backbone, images: ImageDataModule,
                              times: list[float], blocks: list[str], dtype: str, cache_dir: str | Path,
                              draws: int = 1, noise_seed: int = 0, splits: tuple[str, ...] = SPLITS,
                              batch_size: int = 64, recompute: bool = False, checkpoint: str | None = None) -> Path:
    """Build (or reuse) the cache of `blocks`' pooled outputs at every t: a cache with one layer per block."""
    widths = block_widths(backbone, blocks)
    identity = denoiser_identity(backbone.describe(times), blocks, draws, noise_seed, times, dtype, splits,
                                 images.identity())
    return write_cache(trainer, DenoiserFeatures(backbone, blocks, times, splits, draws, noise_seed), identity,
                       {"checkpoint": checkpoint}, ExtractionData(images, splits, batch_size, backbone.normalize),
                       times, widths, dtype, cache_dir, recompute, layers=list(blocks))


class DenoiserFeatures(pl.LightningModule):
    """Predict-loop module: (index, x0, y) -> (index, [(B, T, C_block) per block], y), the pooled block outputs of
    the denoiser at every t of the grid, averaged over `draws` noise draws."""

    def __init__(self, backbone: Backbone, blocks: list[str], times: list[float], splits: tuple[str, ...],
                 draws: int = 1, noise_seed: int = 0) -> None:
        super().__init__()
        if draws < 1:
            raise TrajrepError(f"draws must be >= 1 noise draws per image and t, got {draws}")
        self.backbone, self.network = backbone, backbone.network.eval()  # registered: the Trainer moves it
        self.blocks, self.times, self.draws, self.noise_seed = list(blocks), list(times), draws, noise_seed
        self.splits = tuple(splits)  # in the order of the predict loaders
        BlockOutputs(self.network, self.blocks).remove()  # the names are checked now
        # Hooked only while predicting: a module with hooks (closures) cannot be pickled to DDP's processes.
        self.outputs: BlockOutputs | None = None

    @torch.no_grad()
    def forward(self, split: str, index: torch.Tensor, x0: torch.Tensor) -> list[torch.Tensor]:
        if self.outputs is None:
            self.outputs = BlockOutputs(self.network, self.blocks)
        per_time: list[list[torch.Tensor]] = []
        for time_index, t in enumerate(self.times):
            level = torch.full((x0.shape[0],), t, device=x0.device)
            total = None
            for draw in range(self.draws):
                noise = draw_noise(split, index, time_index, draw, self.noise_seed, tuple(x0.shape[1:])).to(x0)
                self.outputs.taken.clear()
                self.backbone.denoise(self.backbone.noisy(x0, level, noise), level)
                taken = [self.outputs.taken[name] for name in self.blocks]
                total = taken if total is None else [a + b for a, b in zip(total, taken)]
            per_time.append([value / self.draws for value in total])
        return [torch.stack([values[block] for values in per_time], dim=1) for block in range(len(self.blocks))]

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        index, x0, labels = batch
        with full_precision(x0.device):
            return index, self(self.splits[dataloader_idx], index, x0), labels

    def on_predict_end(self) -> None:
        if self.outputs is not None:  # the backbone is left as it came
            self.outputs.remove()
            self.outputs = None
