"""ImageDataModule: what every image dataset gives the rest of trajrep.

Datasets serve uint8 images already at their final size; conversion to float and per-channel standardisation
happen after the batch reaches the device (`normalize`), so loaders stay cheap and the same images can be normalised
identically by pretraining and by representation extraction.
"""

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, Sampler

from trajrep.errors import TrajrepError
from trajrep.threads import available_cpus, default_workers

# Bump when the images a dataset produces change for the same settings, so that caches keyed by `identity` go stale.
DATA_FORMAT_VERSION = 1
SPLITS = ("train", "test")


def files_fingerprint(files: Iterable[Path]) -> str:
    """SHA-256 over each file's path, size and modification time: it changes when a file is replaced, added or
    removed, without reading gigabytes of images on every run."""
    digest = hashlib.sha256()
    for path in sorted(files):
        try:
            stat = path.stat()
        except OSError as error:
            raise TrajrepError(f"data file {path} cannot be read ({error.strerror}); restore it or remove it from "
                               "the dataset folder") from error
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class EpochShuffle(Sampler[int]):
    """A permutation per epoch that depends only on (seed, epoch), so a restarted run can rebuild the order of the
    epoch it stopped in; `resume_after(n)` makes the next pass skip the first n indices (the ones already trained).
    Lightning calls `set_epoch` at every epoch start."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch, self._skip = size, seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_after(self, consumed: int) -> None:
        self._skip = consumed

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed((self.seed % 2**32) * 2**31 + self.epoch)
        order, self._skip = torch.randperm(self.size, generator=generator)[self._skip:], 0
        return iter(order.tolist())


class DeviceBatches(Dataset):
    """A split held as tensors (images, labels) on one device. The DataLoader hands `__getitems__` a whole batch
    of indices, so a batch is one indexing op on that device."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, device=self.images.device)
        return self.images[index], self.labels[index]


def _already_a_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch


class ImageDataModule(LightningDataModule, ABC):
    """Base of the image datamodules: official train/test splits of (uint8 image, long label) items.

    Subclasses describe their data in `__init__` (shape, classes, normalisation) without reading it, check that the
    files are there, call `self.save_hyperparameters()`, and load a split in `_load`.

    `device_resident` keeps the training split on the training device as two tensors and gathers each batch there
    (a GPU fast path for small datasets such as CIFAR, 150 MB as uint8): no loader workers, no host copies.

    Args:
        batch_size: images per training batch.
        num_workers: loader worker processes (0 loads in the main process), at most the CPUs available.
        drop_last: drop the last incomplete training batch.
        device_resident: keep the training split on the training device (GPU fast path).
    """

    def __init__(self, batch_size: int = 100, num_workers: int | None = 0, drop_last: bool = True,
                 device_resident: bool = False) -> None:
        super().__init__()
        if batch_size < 1:
            raise TrajrepError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers is not None and num_workers < 0:
            raise TrajrepError(f"num_workers must be >= 0 (0 loads in the main process), got {num_workers}")
        # None (the default of datasets decoded from files): the CPUs available besides the main process, at most 4.
        # More workers than CPUs only compete for them (and torch warns at every loader).
        requested = default_workers() if num_workers is None else num_workers
        self.num_workers = min(requested, available_cpus())
        if self.num_workers < requested:
            rank_zero_info(f"num_workers {requested} capped at the {self.num_workers} CPUs available")
        self._datasets: dict[str, Dataset] = {}
        self._files_sha256: str | None = None  # stat-ing 200k CelebA files once per process is enough

    @property
    @abstractmethod
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the loaders yield."""

    @property
    @abstractmethod
    def num_classes(self) -> list[int]:
        """Number of classes of each task, in the order of the label columns."""

    @property
    def task_names(self) -> list[str]:
        return ["class"]

    @property
    def mean(self) -> tuple[float, ...] | None:
        """Per-channel mean subtracted by `normalize`; None leaves images in [0, 1]."""
        return None

    @property
    def std(self) -> tuple[float, ...] | None:
        return None

    @abstractmethod
    def _identity_params(self) -> dict[str, Any]:
        """The settings, besides shape and normalisation, that change which images or labels are served."""

    def _data_files(self) -> list[Path]:
        """The files images and labels are read from, fingerprinted into `identity` so that replacing one gives a
        new cache. None for generated data, nor for files that must match published checksums to be read at all."""
        return []

    def _fingerprint(self) -> str:
        if self._files_sha256 is None:
            self._files_sha256 = files_fingerprint(self._data_files())
        return self._files_sha256

    @abstractmethod
    def _load(self, split: str) -> Dataset:
        """Read one official split; called once per split."""

    def identity(self) -> dict[str, Any]:
        """JSON-serialisable description of the data and its transform, part of the representation cache key."""
        cls = type(self)
        return {
            "dataset": f"{cls.__module__}.{cls.__qualname__}",
            "data_format_version": DATA_FORMAT_VERSION,
            "image_shape": list(self.image_shape),
            "num_classes": list(self.num_classes),
            "task_names": list(self.task_names),
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
            "files_sha256": self._fingerprint(),
            **self._identity_params(),
        }

    def dataset(self, split: str) -> Dataset:
        """The official `split` ("train" or "test"), loaded on first request and kept."""
        if split not in SPLITS:
            raise TrajrepError(f"unknown split {split!r}; image datasets have the splits {list(SPLITS)}")
        if split not in self._datasets:
            self._datasets[split] = self._load(split)
        return self._datasets[split]

    def _loader(self, split: str, drop_last: bool, **order: Any) -> DataLoader:
        workers = self.num_workers
        return DataLoader(self.dataset(split), batch_size=self.hparams.batch_size, drop_last=drop_last,
                          num_workers=workers, persistent_workers=workers > 0, **order)

    def stacked(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split as two tensors: uint8 images (N, C, H, W) and labels, in dataset order."""
        with torch.random.fork_rng(devices=[]):  # iterating a loader draws a seed: keep the run's RNG stream as is
            images, labels = map(torch.cat, zip(*self._loader(split, drop_last=False)))
        return images, labels

    def _device_resident_loader(self, split: str, drop_last: bool, **order: Any) -> DataLoader:
        images, labels = self.stacked(split)
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        return DataLoader(DeviceBatches(images.to(device), labels.to(device)), batch_size=self.hparams.batch_size,
                          drop_last=drop_last, collate_fn=_already_a_batch, **order)

    def _training_order(self) -> dict[str, Any]:
        """Sampler arguments of the training loader. The order follows the run's seed and resumes mid-epoch
        exactly (EpochShuffle, skipping the batches a restored run already trained in its unfinished epoch); the
        loader has its own generator, so that starting an epoch draws nothing from the run's RNG stream (which
        checkpoints restore). Under DDP Lightning substitutes its DistributedSampler, and a mid-epoch resume is not
        exact (the interrupted epoch's order restarts from its beginning)."""
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        generator = torch.Generator().manual_seed(seed)
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            return {"shuffle": True, "generator": generator}
        sampler = EpochShuffle(len(self.dataset("train")), seed)
        if trainer is not None and trainer.fit_loop.restarting:
            sampler.set_epoch(trainer.current_epoch)
            done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            if done < self._batches_per_epoch(trainer.limit_train_batches):
                sampler.resume_after(done * self.hparams.batch_size)
        return {"sampler": sampler, "generator": generator}

    def _batches_per_epoch(self, limit: int | float) -> int:
        """Training batches in an epoch, as Lightning counts them under limit_train_batches."""
        size, batch_size = len(self.dataset("train")), self.hparams.batch_size
        batches = size // batch_size if self.hparams.drop_last else -(-size // batch_size)
        return min(batches, limit) if isinstance(limit, int) else int(batches * limit)

    def train_dataloader(self) -> DataLoader:
        size, batch_size = len(self.dataset("train")), self.hparams.batch_size
        if size == 0:
            raise TrajrepError(f"the training split of {type(self).__name__} is empty; check the dataset settings")
        if self.hparams.drop_last and batch_size > size:
            raise TrajrepError(f"batch_size {batch_size} is larger than the {size} training images, so drop_last "
                               "would leave no batch; lower batch_size or set drop_last: false")
        loader = self._device_resident_loader if self.hparams.get("device_resident") else self._loader
        return loader("train", drop_last=self.hparams.drop_last, **self._training_order())

    def val_dataloader(self) -> DataLoader:
        # Its own generator: starting a loader draws a seed, which must not come from the training RNG stream.
        return self._loader("test", drop_last=False, generator=torch.Generator())

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", drop_last=False, generator=torch.Generator())

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 images (..., C, H, W) -> float32 in [0, 1], standardised per channel when the dataset says so."""
        if images_uint8.dtype != torch.uint8:
            raise TypeError(f"normalize expects uint8 images, got {images_uint8.dtype} (normalised twice?)")
        images = images_uint8.float() / 255.0
        if self.mean is None or self.std is None:
            return images
        mean = torch.tensor(self.mean, device=images.device).view(-1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(-1, 1, 1)
        return (images - mean) / std

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels = batch
        return self.normalize(images), labels
