"""RepresentationDataModule: serves cached E(x0, t) of shape (N, T, d) to the probes, extracting on first use."""

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from trajrep.data.base import ImageDataModule
from trajrep.data.cache import RepresentationCache, cache_key
from trajrep.errors import TrajrepError
from trajrep.timegrid import build_time_grid, select_times

STAGES = ("train", "val", "test")


class SeededBatches(IterableDataset):
    """Mini-batches for a grid of probes: step k gives every seed its own k-th batch, shape (S, B, ...).

    Seed s shuffles with its own generator, so each probe seed sees the batch order it would see alone.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, seeds: list[int], batch_size: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        orders = torch.stack([torch.randperm(len(self.x), generator=g) for g in self.generators])
        for start in range(0, len(self.x), self.batch_size):
            rows = orders[:, start:start + self.batch_size]
            yield self.x[rows], self.y[rows]


class RepresentationDataModule(pl.LightningDataModule):
    """Cached representations of a pretrained encoder on an image dataset.

    The cache is keyed by the extracted weights, the time grid, the dataset and the format, so it is rebuilt
    whenever one of them changes and reused otherwise. `num_classes`, `feature_dim`, `num_times` and `times` are
    known right after construction, for the CLI's argument links.
    """

    def __init__(
        self,
        checkpoint: str,
        images: ImageDataModule,
        times: list[float] | None = None,
        granularities: list[int] | None = None,
        probe_times: list[float] | None = None,
        ema: bool = False,
        dtype: Literal["float16", "float32"] = "float32",
        cache_dir: str = "cache",
        extract_batch_size: int = 64,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        seeds: list[int] = [0, 1, 2, 3, 4],
        batch_size: int = 256,
        eval_batch_size: int = 1024,
        recompute: bool = False,
    ) -> None:
        super().__init__()
        # Local import: the probe side reaches the pretraining side only to build a missing cache.
        from trajrep.extract import extraction_identity, load_pretrained_model

        if not 0.0 < val_fraction < 1.0:
            raise TrajrepError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if not seeds or len(set(seeds)) != len(seeds):
            raise TrajrepError(f"seeds must be a non-empty list of distinct probe seeds, got {seeds}")
        self.save_hyperparameters(ignore=["images"])
        self.images = images
        self.grid = build_time_grid(times, granularities)
        self.times = self.grid if probe_times is None else [self.grid[i] for i in select_times(self.grid, probe_times)]
        self._model = load_pretrained_model(checkpoint, ema)
        identity = extraction_identity(self._model, images, self.grid, ema, dtype, ("train", "test"))
        self.cache_path = Path(cache_dir) / cache_key(identity)
        self.feature_dim = self._model.latent_dim
        self.seeds = list(seeds)
        self.metadata = {
            "dataset": images.identity()["dataset"].rsplit(".", 1)[-1],
            "encoder_mode": self._model.hparams.mode,
            "latent_dim": self.feature_dim,
            "pretrain_seed": self._model.pretrain_seed,
            "checkpoint": str(checkpoint),
            "cache_key": self.cache_path.name,
            "weights": "ema" if ema else "raw",
        }
        self._tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def num_classes(self) -> list[int]:
        return self.images.num_classes

    @property
    def task_names(self) -> list[str]:
        return self.images.task_names

    @property
    def num_times(self) -> int:
        return len(self.times)

    def prepare_data(self) -> None:
        """Extract the cache if it is missing (or when recompute is set), on one process."""
        from trajrep.extract import extract_representations

        if self.cache_path.exists() and not self.hparams.recompute:
            return
        trainer = pl.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False)
        extract_representations(trainer, self._model, self.images, self.grid, self.hparams.ema, self.hparams.dtype,
                                self.hparams.cache_dir, batch_size=self.hparams.extract_batch_size,
                                recompute=self.hparams.recompute, checkpoint=self.hparams.checkpoint)

    def setup(self, stage: str | None = None) -> None:
        if self._tensors:
            return
        cache = RepresentationCache(self.cache_path)
        indices = select_times(cache.times, self.times)
        train_x = torch.from_numpy(cache.representations("train", indices)).float()
        train_y = torch.from_numpy(cache.labels("train"))
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(self.hparams.split_seed))
        num_val = round(self.hparams.val_fraction * len(train_x))
        val_rows, train_rows = order[:num_val], order[num_val:]
        self._tensors = {
            "train": (train_x[train_rows], train_y[train_rows]),
            "val": (train_x[val_rows], train_y[val_rows]),
            "test": (torch.from_numpy(cache.representations("test", indices)).float(),
                     torch.from_numpy(cache.labels("test"))),
        }

    def tensors(self, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(representations (N, T, d) float32, labels (N,) or (N, tasks)) of one stage: train, val or test."""
        if stage not in STAGES:
            raise TrajrepError(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
        self.setup()
        return self._tensors[stage]

    def _eval_loader(self, stage: str) -> DataLoader:
        return DataLoader(TensorDataset(*self.tensors(stage)), batch_size=self.hparams.eval_batch_size)

    def train_dataloader(self) -> DataLoader:
        """Per-seed batches (S, B, T, d) for the probe grid; see SeededBatches."""
        return DataLoader(SeededBatches(*self.tensors("train"), self.seeds, self.hparams.batch_size), batch_size=None)

    def val_dataloader(self) -> list[DataLoader]:
        """Validation AND test: the protocol keeps the test accuracy of every epoch, then selects on validation."""
        return [self._eval_loader("val"), self._eval_loader("test")]

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
