"""CelebA: 40 binary face attributes, from torchvision's folder layout, resized to 64 px (method §8).

    root/celeba/img_align_celeba/<image>.jpg
    root/celeba/list_attr_celeba.txt        count, attribute names, then "<image> +-1 x 40"
    root/celeba/list_eval_partition.txt     "<image> 0|1|2" (train, validation, test)

Train is the official training partition (162,770 images), test the official test partition (19,962); the
official validation partition is not used (trajrep's probes carve their own validation split from train).
Images are centre-cropped to a square and resized; each attribute is one task with classes {0: -1, 1: +1}.
"""

import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import transforms

from trajrep.data.base import ImageDataModule
from trajrep.data.image_folder import load_image
from trajrep.errors import TrajrepError

FOLDER = "celeba"
IMAGES = "img_align_celeba"
ATTRIBUTES = "list_attr_celeba.txt"
PARTITION = "list_eval_partition.txt"
PARTITION_OF = {"train": "0", "test": "2"}


class CelebAImages(Dataset):
    """Decodes, crops and resizes each image when it is read (the 200k files are not held in memory)."""

    def __init__(self, folder: Path, names: list[str], labels: torch.Tensor, size: int) -> None:
        self.folder, self.names, self.labels = folder, names, labels
        self.transform = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size),
                                             transforms.PILToTensor()])

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(load_image(str(self.folder / self.names[index]), "RGB")), self.labels[index]


def read_attributes(path: Path) -> tuple[list[str], dict[str, list[int]]]:
    """Attribute names and {image: 40 values in {0, 1}} from list_attr_celeba.txt."""
    lines = path.read_text().splitlines()
    if len(lines) < 2:
        raise TrajrepError(f"{path} is truncated (no attribute names); copy the CelebA files again")
    names = lines[1].split()
    table = {}
    for number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != len(names) + 1 or any(v not in ("1", "-1") for v in fields[1:]):
            raise TrajrepError(f"{path} line {number} is not '<image> +-1 x {len(names)}'; copy the CelebA files "
                               "again")
        table[fields[0]] = [int(v == "1") for v in fields[1:]]
    return names, table


class CelebA(ImageDataModule):
    """CelebA at `image_size` px (64 by default), 40 binary attribute tasks; `root` holds torchvision's `celeba`
    folder. `num_train` / `num_test` keep the first n images of a split (small runs).

    Args:
        root: folder holding torchvision's `celeba` folder.
        image_size: side of the square images after the centre crop.
        num_train: keep the first n training images; None keeps the whole partition.
        num_test: keep the first n test images; None keeps the whole partition.
        num_workers: loader worker processes; None: the CPUs available besides the main process, at most 4.
    """

    def __init__(self, root: str = "data/celeba", image_size: int = 64, num_train: int | None = None,
                 num_test: int | None = None, batch_size: int = 100, num_workers: int | None = None,
                 drop_last: bool = True, device_resident: bool = False) -> None:
        super().__init__(batch_size, num_workers, drop_last, device_resident)
        self._folder = Path(root).resolve() / FOLDER
        missing = [name for name in (IMAGES, ATTRIBUTES, PARTITION) if not (self._folder / name).exists()]
        if missing:
            raise TrajrepError(f"CelebA not found: {self._folder} lacks {', '.join(missing)}; place torchvision's "
                               f"CelebA files there ({FOLDER}/{IMAGES}/*.jpg, {ATTRIBUTES}, {PARTITION})")
        header = (self._folder / ATTRIBUTES).read_text().splitlines()[1:2]
        self._attribute_names = header[0].split() if header else []
        if not self._attribute_names:
            raise TrajrepError(f"{self._folder / ATTRIBUTES} has no attribute names; copy the CelebA files again")
        self.save_hyperparameters()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.hparams.image_size, self.hparams.image_size)

    @property
    def num_classes(self) -> list[int]:
        return [2] * len(self._attribute_names)

    @property
    def task_names(self) -> list[str]:
        return list(self._attribute_names)

    def _identity_params(self) -> dict[str, Any]:
        return {"root": str(self._folder), "image_size": self.hparams.image_size, "crop": "centre",
                "num_train": self.hparams.num_train, "num_test": self.hparams.num_test}

    def _data_files(self) -> list[Path]:
        return [self._folder / ATTRIBUTES, self._folder / PARTITION,
                *(Path(entry.path) for entry in os.scandir(self._folder / IMAGES) if entry.is_file())]

    def _load(self, split: str) -> Dataset:
        _, attributes = read_attributes(self._folder / ATTRIBUTES)
        partition = [line.split() for line in (self._folder / PARTITION).read_text().splitlines() if line.strip()]
        names = [fields[0] for fields in partition if fields[1] == PARTITION_OF[split]]
        keep = self.hparams.num_train if split == "train" else self.hparams.num_test
        names = names[:keep] if keep is not None else names
        unlabelled = [name for name in names if name not in attributes]
        if unlabelled:
            raise TrajrepError(f"{len(unlabelled)} {split} images (e.g. {unlabelled[0]}) have no attributes in "
                               f"{self._folder / ATTRIBUTES}; copy the CelebA files again")
        labels = torch.tensor([attributes[name] for name in names], dtype=torch.long)
        return CelebAImages(self._folder / IMAGES, names, labels, self.hparams.image_size)
