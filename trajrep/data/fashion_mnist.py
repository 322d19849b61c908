"""FashionMNIST: the four gzipped IDX files read directly, padded from 28 to 32 pixels.

Reading the files ourselves keeps the Debian package `dataset-fashion-mnist` usable offline, without torchvision's
own folder layout or checksums.
"""

import gzip
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from trajrep.data.base import ImageDataModule
from trajrep.errors import TrajrepError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # IDX: unsigned bytes, 3 resp. 1 dimensions
SOURCE = 28
PAD = 2
SIZE = SOURCE + 2 * PAD


def read_idx(path: Path, magic: int, item_shape: tuple[int, ...]) -> np.ndarray:
    """The uint8 array of an IDX file, after checking its magic number, item shape and length."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as error:
        raise TrajrepError(f"{path} is not a readable gzip file ({error}); download it again") from error
    header_size = 4 * (2 + len(item_shape))
    if len(raw) < header_size:
        raise TrajrepError(f"{path} is truncated (shorter than its IDX header); download it again")
    found_magic, count, *found_shape = np.frombuffer(raw, dtype=">u4", count=header_size // 4)
    if found_magic != magic or tuple(found_shape) != item_shape:
        raise TrajrepError(f"{path} is not the expected IDX file (magic {found_magic}, item shape "
                           f"{tuple(int(s) for s in found_shape)}; expected magic {magic}, item shape {item_shape}); "
                           "check that the file names were not swapped, or download it again")
    expected = int(count) * int(np.prod(item_shape))
    if len(raw) - header_size != expected:
        raise TrajrepError(f"{path} holds {len(raw) - header_size} data bytes but its header announces {expected}; "
                           "the file is truncated or corrupted, download it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(int(count), *item_shape)


class FashionMNIST(ImageDataModule):
    """Fashion-MNIST, 10 classes, 60k / 10k, served as 1x32x32 (zero-padded 2 px each side) in [0, 1].

    `root` holds the four original .gz files; the default is the Debian package's folder. `num_train` keeps only
    the first n training images and `num_test` the first n test images (small presets).

    Args:
        root: folder of the four IDX .gz files; None: /usr/share/datasets/fashion-mnist.
        num_train: keep the first n training images; None keeps all 60,000.
        num_test: keep the first n test images; None keeps all 10,000.
    """

    def __init__(
        self,
        root: str | None = None,
        num_train: int | None = None,
        num_test: int | None = None,
        batch_size: int = 100,
        num_workers: int = 0,
        drop_last: bool = True,
        device_resident: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, drop_last, device_resident)
        for name, value, total in (("num_train", num_train, "60,000"), ("num_test", num_test, "10,000")):
            if value is not None and value < 1:
                raise TrajrepError(f"{name} must be >= 1 (or null for all {total}), got {value}")
        self._root = Path(DEFAULT_ROOT if root is None else root).resolve()
        self._check_files()
        self.save_hyperparameters()

    def _check_files(self) -> None:
        files = self._data_files()
        names, missing = [path.name for path in files], [path.name for path in files if not path.is_file()]
        if missing:
            where = "does not exist" if not self._root.is_dir() else f"lacks {', '.join(missing)}"
            raise TrajrepError(f"Fashion-MNIST root {self._root} {where}; it needs {', '.join(names)}. Install them "
                               f"with `apt-get install dataset-fashion-mnist` (into {DEFAULT_ROOT}) or download the "
                               "four files from https://github.com/zalandoresearch/fashion-mnist into root")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, SIZE, SIZE)

    @property
    def num_classes(self) -> list[int]:
        return [10]

    def _identity_params(self) -> dict[str, Any]:
        return {"root": str(self._root), "num_train": self.hparams.num_train, "num_test": self.hparams.num_test,
                "padding": PAD}

    def _data_files(self) -> list[Path]:
        return [self._root / name for pair in FILES.values() for name in pair]

    def _load(self, split: str) -> Dataset:
        images_file, labels_file = FILES[split]
        images = read_idx(self._root / images_file, IMAGES_MAGIC, (SOURCE, SOURCE))
        labels = read_idx(self._root / labels_file, LABELS_MAGIC, ())
        if len(images) != len(labels):
            raise TrajrepError(f"{images_file} has {len(images)} images but {labels_file} has {len(labels)} labels "
                               f"in {self._root}; download both again")
        keep = self.hparams.num_train if split == "train" else self.hparams.num_test
        if keep is not None:
            if keep > len(images):
                raise TrajrepError(f"num_{split} {keep} exceeds the {len(images)} {split} images in {self._root}; "
                                   "lower it or set it to null")
            images, labels = images[:keep], labels[:keep]
        padded = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD)))[:, None]
        return TensorDataset(torch.from_numpy(padded), torch.from_numpy(labels.astype(np.int64)))
