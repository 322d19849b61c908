"""ImageFolder: any `root/{train,test}/<class>/<image>` tree, resized to square uint8 images.

Covers datasets shipped as image files (mini-ImageNet, CIFAR exported as PNGs, ...) with one class per folder.
"""

from functools import partial
from pathlib import Path
from typing import Any

import torch
import torchvision
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from trajrep.data.base import SPLITS, ImageDataModule
from trajrep.errors import TrajrepError

LAYOUT = "root/train/<class>/<image>.png|jpg and root/test/<class>/<image>, with the same class folders in both"


def load_image(path: str, mode: str) -> Image.Image:
    """Decode one file to `mode` ("RGB" or "L"); a broken file is named instead of failing deep in a worker."""
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (OSError, SyntaxError, ValueError) as error:
        raise TrajrepError(f"cannot read image {path} ({error}); replace or delete the file") from error


def label_tensor(label: int) -> torch.Tensor:
    return torch.tensor(label, dtype=torch.long)


def find_classes(folder: Path) -> list[str]:
    """Class folder names of one split, sorted as torchvision numbers them."""
    if not folder.is_dir():
        raise TrajrepError(f"{folder} does not exist; ImageFolder expects {LAYOUT}")
    try:
        classes, _ = torchvision.datasets.folder.find_classes(str(folder))
    except FileNotFoundError as error:
        raise TrajrepError(f"{folder} has no class folders; ImageFolder expects {LAYOUT}") from error
    return classes


class ImageFolder(ImageDataModule):
    """Images from class folders, resized to `image_size` x `image_size` with `channels` 1 (grey) or 3 (RGB).

    `mean` and `std` (one value per channel) standardise the images on the device; leave both unset to keep
    [0, 1].
    """

    def __init__(
        self,
        root: str,
        image_size: int = 32,
        channels: int = 3,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        batch_size: int = 100,
        num_workers: int = 0,
        drop_last: bool = True,
        device_resident: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, drop_last, device_resident)
        if image_size < 1:
            raise TrajrepError(f"image_size must be >= 1, got {image_size}")
        if channels not in (1, 3):
            raise TrajrepError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
        if (mean is None) != (std is None):
            raise TrajrepError("set both mean and std (one value per channel) or neither")
        if mean is not None and (len(mean) != channels or len(std) != channels or min(std) <= 0):
            raise TrajrepError(f"mean and std need {channels} values each (one per channel) and std > 0, "
                               f"got mean {mean}, std {std}")
        self._root = Path(root).resolve()
        if not self._root.is_dir():
            raise TrajrepError(f"ImageFolder root {self._root} does not exist; expected {LAYOUT}")
        train, test = (find_classes(self._root / split) for split in SPLITS)
        if train != test:
            raise TrajrepError(f"train and test class folders differ in {self._root}: only in train "
                               f"{sorted(set(train) - set(test))}, only in test {sorted(set(test) - set(train))}; "
                               "both splits need the same class folders (an empty folder is fine)")
        self.classes = train
        self.save_hyperparameters()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = self.hparams.image_size
        return (self.hparams.channels, size, size)

    @property
    def num_classes(self) -> list[int]:
        return [len(self.classes)]

    @property
    def mean(self) -> tuple[float, ...] | None:
        return None if self.hparams.mean is None else tuple(self.hparams.mean)

    @property
    def std(self) -> tuple[float, ...] | None:
        return None if self.hparams.std is None else tuple(self.hparams.std)

    def _identity_params(self) -> dict[str, Any]:
        return {"root": str(self._root), "classes": self.classes}

    def _load(self, split: str) -> Dataset:
        size = self.hparams.image_size
        transform = transforms.Compose([transforms.Resize((size, size)), transforms.PILToTensor()])
        mode = "RGB" if self.hparams.channels == 3 else "L"
        # allow_empty: a class may have no images in one split; numbering still follows the class folders.
        return torchvision.datasets.ImageFolder(str(self._root / split), transform=transform,
                                                target_transform=label_tensor, loader=partial(load_image, mode=mode),
                                                allow_empty=True)
