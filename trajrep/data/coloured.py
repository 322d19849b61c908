"""Coloured: any grey dataset turned into a 3-task colour dataset (method §8), deterministically from a seed.

Each image gets a background colour and a different foreground colour from the 9-colour palette of the synthetic
shapes; a pixel of grey level g becomes g * foreground + (1 - g) * background. The tasks are the source's class,
the background colour and the foreground colour: the colours are independent of the class by construction, so a
representation that keeps one need not keep the other.
"""

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from trajrep.data.base import SPLITS, ImageDataModule
from trajrep.data.synthetic import NUM_COLOURS, PALETTE
from trajrep.errors import TrajrepError

CHUNK = 8192  # images coloured at a time (bounds the int32 intermediate)


def colour_images(grey: torch.Tensor, background: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 1, H, W) grey images and palette indices (N,) -> uint8 (N, 3, H, W), rounded to nearest."""
    palette = torch.from_numpy(PALETTE.astype(np.int32))
    out = torch.empty(grey.shape[0], 3, *grey.shape[2:], dtype=torch.uint8)
    for start in range(0, len(grey), CHUNK):
        part = slice(start, start + CHUNK)
        level = grey[part].to(torch.int32)
        mixed = level * palette[foreground[part]][:, :, None, None] \
            + (255 - level) * palette[background[part]][:, :, None, None]
        out[part] = torch.div(mixed + 127, 255, rounding_mode="floor").to(torch.uint8)
    return out


class Coloured(ImageDataModule):
    """3xHxW colour versions of a 1-channel `source` (e.g. FashionMNIST) with 3 tasks: class, background colour
    (9), foreground colour (9, never the background). The colours of each split are drawn from (`seed`, split).
    Images stay in [0, 1] (no standardisation).

    Args:
        source: the 1-channel, single-task datamodule to colour.
        seed: the colour draws (each split draws from its own stream).
    """

    def __init__(self, source: ImageDataModule, seed: int = 0, batch_size: int = 100, num_workers: int = 0,
                 drop_last: bool = True, device_resident: bool = False) -> None:
        super().__init__(batch_size, num_workers, drop_last, device_resident)
        if source.image_shape[0] != 1 or len(source.num_classes) != 1:
            raise TrajrepError(f"Coloured needs a grey single-task source (1 channel, one label), got "
                               f"{type(source).__name__} with shape {source.image_shape} and tasks "
                               f"{source.task_names}")
        self.source = source
        self.save_hyperparameters(ignore=["source"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, *self.source.image_shape[1:])

    @property
    def num_classes(self) -> list[int]:
        return [self.source.num_classes[0], NUM_COLOURS, NUM_COLOURS]

    @property
    def task_names(self) -> list[str]:
        return ["class", "background", "foreground"]

    def _identity_params(self) -> dict[str, Any]:
        return {"source": self.source.identity(), "seed": self.hparams.seed, "palette": PALETTE.tolist()}

    def _load(self, split: str) -> Dataset:
        grey, labels = self.source.stacked(split)
        generator = torch.Generator().manual_seed(self.hparams.seed * len(SPLITS) + SPLITS.index(split))
        background = torch.randint(NUM_COLOURS, (len(grey),), generator=generator)
        foreground = (background + 1 + torch.randint(NUM_COLOURS - 1, (len(grey),), generator=generator)) \
            % NUM_COLOURS
        images = colour_images(grey, background, foreground)
        return TensorDataset(images, torch.stack([labels.long(), background, foreground], dim=1))
