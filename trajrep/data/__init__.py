"""Image datamodules: uint8 images at their final size, normalised on the device by `ImageDataModule.normalize`."""

from trajrep.data.base import ImageDataModule
from trajrep.data.celeba import CelebA
from trajrep.data.cifar import CIFAR10, CIFAR100
from trajrep.data.coloured import Coloured
from trajrep.data.fashion_mnist import FashionMNIST
from trajrep.data.image_folder import ImageFolder
from trajrep.data.synthetic import SyntheticShapes

__all__ = ["CIFAR10", "CIFAR100", "CelebA", "Coloured", "FashionMNIST", "ImageDataModule", "ImageFolder", "SyntheticShapes"]
