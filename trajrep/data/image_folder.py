"""ImageFolder: any `root/{train,test}/<class>/<image>` tree, resized to square uint8 images.

Covers datasets shipped as image files (mini-ImageNet, CIFAR exported as PNGs, ...) with one class per folder.
"""

from functools import partial
from pathlib import Path
from typing import Any

import torch
import torchvision
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

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


def balanced_subset(labels: list[int], size: int, seed: int) -> list[int]:
    """`size` indices, as equal per class as the classes allow (a small class gives all it has, the others make up
    the rest), each class's images drawn in a seeded random order; returned in dataset order."""
    generator = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    queues = [[members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
              for _, members in sorted(by_class.items())]
    chosen: list[int] = []
    for rank in range(max(map(len, queues), default=0)):  # one image of every class that still has one, per round
        chosen += [queue[rank] for queue in queues if rank < len(queue)][:size - len(chosen)]
        if len(chosen) == size:
            break
    return sorted(chosen)


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
    [0, 1]. `num_train` / `num_test` keep a class-balanced subset of a split (as equal per class as the classes
    allow), drawn with `subset_seed`; unset keeps every image.

    Args:
        root: folder holding train/<class>/<image> and test/<class>/<image>.
        image_size: side of the square images after resizing.
        channels: 1 (grey) or 3 (RGB).
        mean: per-channel mean subtracted on the device; None with std None keeps [0, 1].
        std: per-channel std divided by on the device.
        num_train: size of a class-balanced training subset; None keeps every image.
        num_test: size of a class-balanced test subset; None keeps every image.
        subset_seed: the draw of the subsets.
        num_workers: loader worker processes; None: the CPUs available besides the main process, at most 4.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 32,
        channels: int = 3,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        num_train: int | None = None,
        num_test: int | None = None,
        subset_seed: int = 0,
        batch_size: int = 100,
        num_workers: int | None = None,
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
        for name, value in (("num_train", num_train), ("num_test", num_test)):
            if value is not None and value < 1:
                raise TrajrepError(f"{name} must be >= 1 (or null for every image), got {value}")
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
        return {"root": str(self._root), "classes": self.classes, "num_train": self.hparams.num_train,
                "num_test": self.hparams.num_test, "subset_seed": self.hparams.subset_seed}

    def _data_files(self) -> list[Path]:
        return [Path(path) for split in SPLITS
                for path, _ in torchvision.datasets.folder.make_dataset(str(self._root / split),
                                                                        extensions=IMG_EXTENSIONS, allow_empty=True)]

    def _load(self, split: str) -> Dataset:
        size = self.hparams.image_size
        transform = transforms.Compose([transforms.Resize((size, size)), transforms.PILToTensor()])
        mode = "RGB" if self.hparams.channels == 3 else "L"
        # allow_empty: a class may have no images in one split; numbering still follows the class folders.
        images = torchvision.datasets.ImageFolder(str(self._root / split), transform=transform,
                                                  target_transform=label_tensor,
                                                  loader=partial(load_image, mode=mode), allow_empty=True)
        keep = self.hparams.num_train if split == "train" else self.hparams.num_test
        if keep is None:
            return images
        if keep > len(images):
            raise TrajrepError(f"num_{split} {keep} exceeds the {len(images)} {split} images in "
                               f"{self._root / split}; lower it or set it to null")
        return Subset(images, balanced_subset(images.targets, keep, self.hparams.subset_seed))
