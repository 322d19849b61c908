"""SyntheticShapes: the paper's generated 4-task data (method §8), built in memory from a seed.

Every combination of background colour, foreground colour, location and shape is one image, so each attribute is
exactly recoverable and the tasks are independent by construction; the seed only decides which combinations are
used for training.
"""

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from trajrep.data.base import ImageDataModule
from trajrep.errors import TrajrepError

PALETTE = np.array([
    (255, 0, 0), (0, 255, 0), (0, 0, 255),
    (255, 255, 0), (255, 0, 255), (0, 255, 255),
    (255, 255, 255), (0, 0, 0), (128, 128, 128),
], dtype=np.uint8)
SHAPE_NAMES = ("square", "disc", "triangle", "plus", "diamond")
GRID = 4  # locations form a GRID x GRID grid of cells
CELL = 8  # cell side in pixels
IMAGE_SIZE = GRID * CELL
NUM_COLOURS = len(PALETTE)
NUM_COMBINATIONS = NUM_COLOURS * (NUM_COLOURS - 1) * GRID * GRID * len(SHAPE_NAMES)


def shape_masks() -> np.ndarray:
    """(5, CELL, CELL) bool masks in SHAPE_NAMES order; each covers the cell centre and leaves its corners empty."""
    centres = np.arange(CELL) + 0.5 - CELL / 2  # pixel centres, -3.5 .. 3.5
    y, x = np.meshgrid(centres, centres, indexing="ij")
    ax, ay = np.abs(x), np.abs(y)
    return np.stack([
        np.maximum(ax, ay) <= 3,  # square, 6x6
        x ** 2 + y ** 2 <= 3.6 ** 2,  # disc
        ax <= (y + 4.5) / 2,  # triangle, apex up
        np.minimum(ax, ay) <= 1,  # plus, arms 2 px wide
        ax + ay <= 4,  # diamond
    ])


def all_labels() -> np.ndarray:
    """(NUM_COMBINATIONS, 4) int64 labels: background, foreground (never the background), location, shape."""
    bg, fg_offset, loc, shape = np.meshgrid(np.arange(NUM_COLOURS), np.arange(NUM_COLOURS - 1), np.arange(GRID ** 2),
                                            np.arange(len(SHAPE_NAMES)), indexing="ij")
    fg = (bg + 1 + fg_offset) % NUM_COLOURS
    return np.stack([bg, fg, loc, shape], axis=-1).reshape(-1, 4).astype(np.int64)


def render(labels: np.ndarray) -> np.ndarray:
    """(N, 4) labels -> (N, 3, 32, 32) uint8 images, vectorised over N."""
    # One full-size mask per (location, shape) pair, then a lookup per image.
    cells = np.zeros((GRID ** 2, len(SHAPE_NAMES), IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    masks = shape_masks()
    for loc in range(GRID ** 2):
        row, col = divmod(loc, GRID)
        cells[loc, :, row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL] = masks
    foreground = cells[labels[:, 2], labels[:, 3]][:, None]  # (N, 1, H, W)
    bg = PALETTE[labels[:, 0]][:, :, None, None]  # (N, 3, 1, 1)
    fg = PALETTE[labels[:, 1]][:, :, None, None]
    return np.where(foreground, fg, bg)


class SyntheticShapes(ImageDataModule):
    """3x32x32 images with 4 tasks: background colour (9), foreground colour (9), location (16), shape (5).

    All 5,760 combinations exist once; a permutation drawn from `seed` gives the first `num_train` to train and the
    next `num_test` (default: all the rest) to test. Images stay in [0, 1] (no standardisation).

    Args:
        seed: the permutation that splits the combinations into train and test.
        num_train: training images.
        num_test: test images; None takes all the combinations left.
    """

    def __init__(
        self,
        seed: int = 0,
        num_train: int = 4000,
        num_test: int | None = None,
        batch_size: int = 100,
        num_workers: int = 0,
        drop_last: bool = True,
        device_resident: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, drop_last, device_resident)
        if not 1 <= num_train < NUM_COMBINATIONS:
            raise TrajrepError(f"num_train must be in [1, {NUM_COMBINATIONS - 1}] (there are {NUM_COMBINATIONS} "
                               f"combinations and the test split needs some), got {num_train}")
        left = NUM_COMBINATIONS - num_train
        if num_test is not None and not 1 <= num_test <= left:
            raise TrajrepError(f"num_test must be in [1, {left}] with num_train {num_train} (or null for all the "
                               f"rest), got {num_test}")
        self.save_hyperparameters()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, IMAGE_SIZE, IMAGE_SIZE)

    @property
    def num_classes(self) -> list[int]:
        return [NUM_COLOURS, NUM_COLOURS, GRID ** 2, len(SHAPE_NAMES)]

    @property
    def task_names(self) -> list[str]:
        return ["background", "foreground", "location", "shape"]

    def _identity_params(self) -> dict[str, Any]:
        return {"seed": self.hparams.seed, "num_train": self.hparams.num_train, "num_test": self.hparams.num_test}

    def _load(self, split: str) -> Dataset:
        generator = torch.Generator().manual_seed(self.hparams.seed)
        order = torch.randperm(NUM_COMBINATIONS, generator=generator).numpy()
        num_train, num_test = self.hparams.num_train, self.hparams.num_test
        end = NUM_COMBINATIONS if num_test is None else num_train + num_test
        chosen = order[:num_train] if split == "train" else order[num_train:end]
        labels = all_labels()[chosen]
        return TensorDataset(torch.from_numpy(render(labels)), torch.from_numpy(labels))
