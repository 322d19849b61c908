"""CIFAR-10 and CIFAR-100 from torchvision's folder format, held in memory as one uint8 tensor per split.

Converting the split once avoids a PIL round trip per image, which would dominate the cost of small models.
The official python-format batches are pickles; torchvision's reader unpickles them unrestricted, so a tampered
file could run code. trajrep reads them with an unpickler that admits nothing but numpy's array reconstruction.
"""

import importlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch.utils.data import Dataset, TensorDataset
from torchvision.datasets import cifar as torchvision_cifar
from torchvision.datasets.utils import download_and_extract_archive

from trajrep.data.base import ImageDataModule
from trajrep.errors import TrajrepError


@dataclass(frozen=True)
class CIFARVariant:
    """What differs between CIFAR-10 and CIFAR-100: torchvision's reader, class count and method §5 statistics."""

    name: str
    reader: type[torchvision.datasets.CIFAR10]
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def file_names(self) -> list[str]:
        return [name for name, _ in self.reader.train_list + self.reader.test_list] + [self.reader.meta["filename"]]


CIFAR10_VARIANT = CIFARVariant("CIFAR-10", torchvision.datasets.CIFAR10, 10,
                               (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_VARIANT = CIFARVariant("CIFAR-100", torchvision.datasets.CIFAR100, 100,
                                (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))


class ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays only: any other global in the stream is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch file")
        return getattr(importlib.import_module(module), name)


def read_cifar_batch(path: Path) -> dict:
    """One python-format CIFAR batch file: {"data": (N, 3072) uint8, "labels" or "fine_labels": [...], ...}."""
    try:
        with open(path, "rb") as handle:
            return ArraysOnlyUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as error:
        raise TrajrepError(f"{path} is not a CIFAR batch file ({error}); copy the torchvision-format files "
                           "again") from None


class CIFARDataModule(ImageDataModule):
    """3x32x32 CIFAR images standardised per channel; `root` holds torchvision's extracted folder."""

    def __init__(self, variant: CIFARVariant, root: str, download: bool, batch_size: int, num_workers: int,
                 drop_last: bool, device_resident: bool) -> None:
        super().__init__(batch_size, num_workers, drop_last, device_resident)
        self._variant = variant
        self._root = Path(root).resolve()
        if not download:
            self._check_files()
        # Records the calling subclass's arguments too (root, download, batch_size, ...), not the variant object.
        self.save_hyperparameters(ignore=["variant"])

    @property
    def _folder(self) -> Path:
        return self._root / self._variant.reader.base_folder

    def _check_files(self) -> None:
        missing = [name for name in self._variant.file_names if not (self._folder / name).is_file()]
        if missing:
            raise TrajrepError(f"{self._variant.name} not found: expected torchvision's python-format files in "
                               f"{self._folder} (missing {', '.join(missing)}). Set `download: true` to fetch them "
                               "(needs internet), or place the extracted torchvision-format folder there")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, 32, 32)

    @property
    def num_classes(self) -> list[int]:
        return [self._variant.num_classes]

    @property
    def mean(self) -> tuple[float, ...]:
        return self._variant.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self._variant.std

    def _identity_params(self) -> dict[str, Any]:
        return {"root": str(self._root)}

    def prepare_data(self) -> None:
        """Download and extract on one process before the others read the files (only with `download: true`)."""
        if not self.hparams.download or all((self._folder / n).is_file() for n in self._variant.file_names):
            return
        reader = self._variant.reader
        try:
            download_and_extract_archive(reader.url, str(self._root), filename=reader.filename, md5=reader.tgz_md5)
        except (OSError, RuntimeError) as error:  # RuntimeError: the archive failed its checksum
            raise TrajrepError(f"downloading {self._variant.name} into {self._root} failed ({error}); "
                               "`download: true` needs internet, otherwise place the torchvision-format files in "
                               f"{self._folder}") from error

    def _load(self, split: str) -> Dataset:
        files = self._variant.reader.train_list if split == "train" else self._variant.reader.test_list
        for name, md5 in files:
            if not torchvision_cifar.check_integrity(str(self._folder / name), md5):
                raise TrajrepError(f"{self._variant.name} file {self._folder / name} is missing or fails its "
                                   "checksum; delete the folder and set `download: true` (needs internet), or copy "
                                   "the torchvision-format files again")
        batches = [read_cifar_batch(self._folder / name) for name, _ in files]
        data = np.concatenate([batch["data"] for batch in batches]).reshape(-1, 3, 32, 32)
        labels = [label for batch in batches for label in batch.get("labels", batch.get("fine_labels", []))]
        return TensorDataset(torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8)),
                             torch.tensor(labels, dtype=torch.long))


class CIFAR10(CIFARDataModule):
    """CIFAR-10: 10 classes, 50k / 10k, standardised with the method §5 statistics.

    Args:
        root: folder holding torchvision's `cifar-10-batches-py` folder.
        download: fetch the files into root when they are missing (needs internet).
    """

    def __init__(self, root: str = "data/cifar10", download: bool = False, batch_size: int = 100,
                 num_workers: int = 0, drop_last: bool = True, device_resident: bool = False) -> None:
        super().__init__(CIFAR10_VARIANT, root, download, batch_size, num_workers, drop_last, device_resident)


class CIFAR100(CIFARDataModule):
    """CIFAR-100 (fine labels): 100 classes, 50k / 10k, standardised with the method §5 statistics.

    Args:
        root: folder holding torchvision's `cifar-100-python` folder.
        download: fetch the files into root when they are missing (needs internet).
    """

    def __init__(self, root: str = "data/cifar100", download: bool = False, batch_size: int = 100,
                 num_workers: int = 0, drop_last: bool = True, device_resident: bool = False) -> None:
        super().__init__(CIFAR100_VARIANT, root, download, batch_size, num_workers, drop_last, device_resident)
