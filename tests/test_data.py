"""Image datamodules: generated shapes, Fashion-MNIST IDX files, CIFAR folders, image folders, and the shared base."""

import gzip
import json
import pathlib
import pickle
import shutil
import struct
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import fake_cifar, tiny_fit_args
from trajrep.cli import main
from trajrep.data import (CIFAR10, CIFAR100, CelebA, Coloured, FashionMNIST, ImageDataModule, ImageFolder,
                          SyntheticShapes)
from trajrep.data.fashion_mnist import DEFAULT_ROOT
from trajrep.data.image_folder import balanced_subset
from trajrep.data.synthetic import NUM_COMBINATIONS, PALETTE
from trajrep.errors import TrajrepError


def tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), torch.stack(labels)


def forbid_loading(monkeypatch, cls: type) -> None:
    def fail(self, split):
        raise AssertionError("data was loaded although only its description was asked for")

    monkeypatch.setattr(cls, "_load", fail)


# ---------------------------------------------------------------- synthetic shapes

@pytest.fixture(scope="module")
def shapes() -> SyntheticShapes:
    return SyntheticShapes(seed=0)


@pytest.fixture(scope="module")
def shapes_all(shapes) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and test of seed 0 together: every combination once."""
    train, test = tensors(shapes.dataset("train")), tensors(shapes.dataset("test"))
    return torch.cat([train[0], test[0]]), torch.cat([train[1], test[1]])


def test_shapes_description_is_known_without_generating(monkeypatch):
    forbid_loading(monkeypatch, SyntheticShapes)
    data = SyntheticShapes()
    assert data.image_shape == (3, 32, 32)
    assert data.num_classes == [9, 9, 16, 5]
    assert data.task_names == ["background", "foreground", "location", "shape"]
    json.dumps(data.identity())


def test_shapes_split_sizes_and_item_format(shapes):
    assert (len(shapes.dataset("train")), len(shapes.dataset("test"))) == (4000, NUM_COMBINATIONS - 4000)
    image, label = shapes.dataset("train")[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert label.dtype == torch.long and label.shape == (4,)
    small = SyntheticShapes(num_train=64, num_test=48)
    assert (len(small.dataset("train")), len(small.dataset("test"))) == (64, 48)


def test_shapes_are_deterministic_for_a_seed_and_differ_across_seeds(shapes):
    first = tensors(shapes.dataset("train"))
    again = tensors(SyntheticShapes(seed=0).dataset("train"))
    other = tensors(SyntheticShapes(seed=1).dataset("train"))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])


def test_every_combination_appears_exactly_once(shapes_all):
    images, labels = shapes_all
    assert len({tuple(row) for row in labels.tolist()}) == NUM_COMBINATIONS == 9 * 8 * 16 * 5
    assert len({bytes(image.numpy()) for image in images}) == NUM_COMBINATIONS
    assert labels.min(0).values.tolist() == [0, 0, 0, 0] and labels.max(0).values.tolist() == [8, 8, 15, 4]


def test_foreground_never_equals_background(shapes_all):
    _, labels = shapes_all
    assert (labels[:, 0] != labels[:, 1]).all()


def test_pixel_colours_match_the_labels(shapes_all):
    images, labels = shapes_all
    palette = torch.from_numpy(PALETTE)
    background, foreground, location = palette[labels[:, 0]], palette[labels[:, 1]], labels[:, 2]
    assert torch.equal(images[:, :, 0, 0], background)  # the image corner is never covered by a shape
    # Every shape covers its cell's centre pixel.
    rows, cols = (location // 4) * 8 + 3, (location % 4) * 8 + 3
    centre = images[torch.arange(len(images)), :, rows, cols]
    assert torch.equal(centre, foreground)
    # Shape pixels stay inside the labelled cell: outside it, every pixel is the background colour.
    inside = torch.zeros(len(images), 32, 32, dtype=torch.bool)
    for cell in range(16):
        r, c = divmod(cell, 4)
        inside[location == cell, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = True
    outside_pixels = images.permute(0, 2, 3, 1)[~inside]
    expected = background[:, None, None, :].expand(-1, 32, 32, -1)[~inside]
    assert torch.equal(outside_pixels, expected)


def test_same_shape_label_draws_the_same_mask(shapes_all):
    images, labels = shapes_all
    masks = {}
    for image, (bg, _, loc, shape) in zip(images, labels.tolist()):
        mask = (image != torch.from_numpy(PALETTE[bg])[:, None, None]).any(0)
        masks.setdefault((loc, shape), set()).add(bytes(mask.numpy()))
    assert all(len(drawn) == 1 for drawn in masks.values())
    assert len({next(iter(m)) for (loc, _), m in masks.items() if loc == 0}) == 5  # five distinct shapes


def test_shapes_bad_sizes_are_clear_errors():
    with pytest.raises(TrajrepError, match="num_train must be in"):
        SyntheticShapes(num_train=NUM_COMBINATIONS)
    with pytest.raises(TrajrepError, match="num_test must be in"):
        SyntheticShapes(num_train=5000, num_test=1000)


def test_identity_names_the_data_not_the_loader(shapes):
    identity = shapes.identity()
    assert json.loads(json.dumps(identity)) == identity
    assert identity["dataset"] == "trajrep.data.synthetic.SyntheticShapes" and identity["seed"] == 0
    assert "batch_size" not in identity and "num_workers" not in identity
    assert SyntheticShapes(batch_size=7, num_workers=1).identity() == identity
    assert SyntheticShapes(seed=1).identity() != identity
    assert shapes.hparams.seed == 0 and shapes.hparams.batch_size == 100


def test_unknown_split_is_a_clear_error(shapes):
    with pytest.raises(TrajrepError, match="'val'.*train.*test"):
        shapes.dataset("val")


# ---------------------------------------------------------------- loaders and normalisation

def test_loaders_batch_uint8_images_and_labels():
    data = SyntheticShapes(num_train=50, num_test=30, batch_size=16)
    train = list(data.train_dataloader())
    assert len(train) == 3  # 50 // 16, the last partial batch dropped
    images, labels = train[0]
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.uint8 and labels.shape == (16, 4)
    assert [len(b[0]) for b in data.val_dataloader()] == [16, 14]
    assert torch.equal(torch.cat([b[1] for b in data.test_dataloader()]), tensors(data.dataset("test"))[1])


def test_batch_larger_than_training_split_with_drop_last_is_a_clear_error():
    with pytest.raises(TrajrepError, match="batch_size 100 is larger than the 64 training images.*drop_last"):
        SyntheticShapes(num_train=64, batch_size=100).train_dataloader()
    loader = SyntheticShapes(num_train=64, batch_size=100, drop_last=False).train_dataloader()
    assert [len(b[0]) for b in loader] == [64]


def test_unnormalised_data_is_scaled_to_unit_interval():
    data = SyntheticShapes()
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    labels = torch.zeros(2, 4, dtype=torch.long)
    out, out_labels = data.on_after_batch_transfer((images, labels), 0)
    assert out.dtype == torch.float32 and out_labels is labels
    assert torch.allclose(out[:, :, 0, 0], torch.tensor([0.0, 0.2, 1.0]))


def test_cifar_normalisation_standardises_each_channel(tmp_path, monkeypatch):
    fake_cifar(tmp_path, monkeypatch)
    data = CIFAR10(root=str(tmp_path))
    mean, std = torch.tensor(data.mean), torch.tensor(data.std)
    # A batch whose channel c is the constant v_c comes out as (v_c / 255 - mean_c) / std_c everywhere.
    values = torch.tensor([10, 128, 250], dtype=torch.uint8)
    images = values.view(1, 3, 1, 1).expand(4, 3, 8, 8).contiguous()
    labels = torch.arange(4)
    out, out_labels = data.on_after_batch_transfer((images, labels), 0)
    expected = (values.float() / 255 - mean) / std
    assert torch.allclose(out.mean(dim=(0, 2, 3)), expected, atol=1e-6)
    assert torch.allclose(out.std(dim=(0, 2, 3)), torch.zeros(3), atol=1e-6)
    assert torch.equal(out_labels, labels)
    # Pixels at the dataset mean map to about 0, and one std up to about 1.
    at_mean = torch.round(mean * 255).to(torch.uint8).view(3, 1, 1).expand(3, 2, 2)
    assert data.normalize(at_mean).abs().max() < 0.5 / 255 / std.min()
    with pytest.raises(TypeError, match="uint8"):
        data.normalize(out)


def test_cifar_statistics_follow_the_spec():
    from trajrep.data.cifar import CIFAR10_VARIANT, CIFAR100_VARIANT

    assert CIFAR10_VARIANT.mean == (0.4914, 0.4822, 0.4465) and CIFAR10_VARIANT.std == (0.2470, 0.2435, 0.2616)
    assert CIFAR100_VARIANT.mean == (0.5071, 0.4867, 0.4408) and CIFAR100_VARIANT.std == (0.2675, 0.2565, 0.2761)


# ---------------------------------------------------------------- Fashion-MNIST

def write_idx(path: pathlib.Path, magic: int, array: np.ndarray, cut: int = 0) -> None:
    """A gzipped IDX file (big-endian header, uint8 data); `cut` drops that many trailing data bytes."""
    header = struct.pack(f">{2 + array.ndim - 1}I", magic, len(array), *array.shape[1:])
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload[:len(payload) - cut]))


def fake_fashion(root: pathlib.Path, num_train: int = 12, num_test: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", num_train), ("t10k", num_test)):
        images = rng.integers(1, 256, size=(n, 28, 28), dtype=np.uint8)  # never 0, so padding is visible
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", 2051, images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 2049, labels)
        arrays[prefix] = (images, labels)
    return arrays


def test_fashion_identity_changes_when_a_file_is_replaced(tmp_path):
    fake_fashion(tmp_path)
    identity = FashionMNIST(root=str(tmp_path)).identity()
    assert FashionMNIST(root=str(tmp_path)).identity() == identity
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2049, np.zeros(5, dtype=np.uint8))  # other test labels
    assert FashionMNIST(root=str(tmp_path)).identity() != identity


def test_fashion_reads_idx_files_and_pads_to_32(tmp_path, monkeypatch):
    arrays = fake_fashion(tmp_path)
    forbid_loading(monkeypatch, FashionMNIST)
    data = FashionMNIST(root=str(tmp_path))
    assert (data.image_shape, data.num_classes, data.task_names) == ((1, 32, 32), [10], ["class"])
    assert data.identity()["root"] == str(tmp_path.resolve())
    monkeypatch.undo()
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = tensors(data.dataset(split))
        source_images, source_labels = arrays[prefix]
        assert images.shape == (len(source_images), 1, 32, 32) and images.dtype == torch.uint8
        assert torch.equal(images[:, 0, 2:30, 2:30], torch.from_numpy(source_images))
        border = images.clone()
        border[:, :, 2:30, 2:30] = 0
        assert border.sum() == 0  # two rows / columns of zeros on every side
        assert labels.dtype == torch.long and labels.shape == (len(source_labels),)
        assert torch.equal(labels, torch.from_numpy(source_labels).long())
    out = data.normalize(images)
    assert out.max() <= 1.0 and out.min() >= 0.0  # grey data stays in [0, 1]


def test_fashion_num_train_keeps_the_first_images(tmp_path):
    arrays = fake_fashion(tmp_path)
    images, _ = tensors(FashionMNIST(root=str(tmp_path), num_train=4).dataset("train"))
    assert torch.equal(images[:, 0, 2:30, 2:30], torch.from_numpy(arrays["train"][0][:4]))
    with pytest.raises(TrajrepError, match="num_train 99 exceeds the 12 train images"):
        FashionMNIST(root=str(tmp_path), num_train=99).dataset("train")


@pytest.mark.skipif(not pathlib.Path(DEFAULT_ROOT).is_dir(), reason="Debian package dataset-fashion-mnist absent")
def test_fashion_real_debian_files_have_official_sizes():
    data = FashionMNIST()
    train, test = data.dataset("train"), data.dataset("test")
    assert (len(train), len(test)) == (60000, 10000)
    image, label = test[0]
    assert image.shape == (1, 32, 32) and 0 <= int(label) < 10
    labels = torch.stack([test[i][1] for i in range(len(test))])
    assert torch.bincount(labels).tolist() == [1000] * 10


def test_fashion_missing_root_says_how_to_get_the_files(tmp_path):
    with pytest.raises(TrajrepError, match=r"nowhere does not exist.*apt-get install dataset-fashion-mnist"):
        FashionMNIST(root=str(tmp_path / "nowhere"))


def test_fashion_missing_files_are_listed(tmp_path):
    fake_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(TrajrepError, match=r"lacks t10k-labels-idx1-ubyte\.gz;.*github\.com/zalandoresearch"):
        FashionMNIST(root=str(tmp_path))


def test_fashion_truncated_or_wrong_files_are_named(tmp_path):
    fake_fashion(tmp_path)
    images = np.zeros((12, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", 2051, images, cut=100)
    data = FashionMNIST(root=str(tmp_path))
    with pytest.raises(TrajrepError, match=r"train-images-idx3-ubyte\.gz holds 9308 data bytes.*announces 9408"):
        data.dataset("train")
    # A download cut short breaks the gzip stream itself.
    labels_file = tmp_path / "t10k-labels-idx1-ubyte.gz"
    labels_file.write_bytes(labels_file.read_bytes()[:-10])
    with pytest.raises(TrajrepError, match=r"t10k-labels-idx1-ubyte\.gz is not a readable gzip"):
        data.dataset("test")
    # Images where labels should be: wrong magic number.
    write_idx(labels_file, 2051, images)
    with pytest.raises(TrajrepError, match=r"t10k-labels-idx1-ubyte\.gz is not the expected IDX file"):
        data.dataset("test")


# ---------------------------------------------------------------- CIFAR

def test_cifar_loads_whole_split_as_uint8_tensor(tmp_path, monkeypatch):
    batches = fake_cifar(tmp_path, monkeypatch)
    data = CIFAR10(root=str(tmp_path))
    images, labels = data.dataset("train").tensors
    expected = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert images.dtype == torch.uint8 and images.shape == (20, 3, 32, 32)
    assert torch.equal(images, torch.from_numpy(expected))
    assert labels.dtype == torch.long
    assert labels.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    test_images, test_labels = tensors(data.dataset("test"))
    assert torch.equal(test_images, torch.from_numpy(batches["test_batch"][0].reshape(-1, 3, 32, 32)))
    assert test_labels.tolist() == batches["test_batch"][1]


def test_cifar_description_is_known_without_reading(tmp_path, monkeypatch):
    fake_cifar(tmp_path, monkeypatch)
    forbid_loading(monkeypatch, CIFAR10)
    data = CIFAR10(root=str(tmp_path), batch_size=50)
    assert (data.image_shape, data.num_classes) == ((3, 32, 32), [10])
    assert data.hparams.root == str(tmp_path) and data.hparams.batch_size == 50 and "variant" not in data.hparams
    identity = data.identity()
    assert identity["dataset"] == "trajrep.data.cifar.CIFAR10" and identity["mean"] == [0.4914, 0.4822, 0.4465]
    assert CIFAR100(root=str(tmp_path), download=True).num_classes == [100]  # download: files checked later


def test_cifar_missing_folder_says_where_and_how(tmp_path):
    with pytest.raises(TrajrepError, match=r"nowhere/cifar-10-batches-py.*data_batch_1.*download: true"):
        CIFAR10(root=str(tmp_path / "nowhere"))
    with pytest.raises(TrajrepError, match=r"cifar-100-python \(missing train, test, meta\).*download: true"):
        CIFAR100(root=str(tmp_path))


def test_cifar_corrupted_files_are_a_clear_error(tmp_path, monkeypatch):
    fake_cifar(tmp_path, monkeypatch)
    monkeypatch.undo()  # the real md5 check now rejects the fake files
    data = CIFAR10(root=str(tmp_path))
    with pytest.raises(TrajrepError, match="data_batch_1 is missing or fails its checksum.*download: true"):
        data.dataset("train")


def test_cifar_batch_that_would_run_code_is_refused(tmp_path, monkeypatch):
    fake_cifar(tmp_path, monkeypatch)

    class RunsCode:
        def __reduce__(self):
            return (print, ("this must not run",))

    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(pickle.dumps({"data": RunsCode()}))
    with pytest.raises(TrajrepError, match=r"data_batch_2 is not a CIFAR batch file .*builtins\.print"):
        CIFAR10(root=str(tmp_path)).dataset("train")


# ---------------------------------------------------------------- image folders

def fake_image_folder(root: pathlib.Path, train_classes=("cat", "dog"), test_classes=("cat", "dog")) -> None:
    sizes = [(40, 30), (17, 17), (64, 48)]
    for split, classes in (("train", train_classes), ("test", test_classes)):
        for label, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i, size in enumerate(sizes):
                colour = (60 * label + 20, 100, 200 - 10 * i)
                suffix = "png" if i % 2 == 0 else "jpg"
                Image.new("RGB", size, colour).save(root / split / name / f"{i}.{suffix}")


def test_image_folder_resizes_and_numbers_classes(tmp_path, monkeypatch):
    fake_image_folder(tmp_path)
    forbid_loading(monkeypatch, ImageFolder)
    data = ImageFolder(root=str(tmp_path), image_size=24, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    assert (data.image_shape, data.num_classes) == ((3, 24, 24), [2])
    assert data.identity()["classes"] == ["cat", "dog"] and data.identity()["std"] == [0.25] * 3
    monkeypatch.undo()
    images, labels = tensors(data.dataset("train"))
    assert images.shape == (6, 3, 24, 24) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 0, 0, 1, 1, 1] and labels.dtype == torch.long
    assert images[0, :, 12, 12].tolist() == [20, 100, 200]  # png keeps the exact colour through resizing
    assert torch.allclose(data.normalize(images[:1])[0, :, 0, 0], (torch.tensor([20, 100, 200]) / 255 - 0.5) / 0.25)
    grey = ImageFolder(root=str(tmp_path), image_size=8, channels=1)
    assert grey.dataset("test")[0][0].shape == (1, 8, 8)


def test_image_folder_class_mismatch_is_a_clear_error(tmp_path):
    fake_image_folder(tmp_path, test_classes=("cat", "fox"))
    with pytest.raises(TrajrepError, match=r"only in train \['dog'\], only in test \['fox'\]"):
        ImageFolder(root=str(tmp_path))


def test_image_folder_missing_split_describes_the_layout(tmp_path):
    fake_image_folder(tmp_path)
    shutil.rmtree(tmp_path / "test")
    with pytest.raises(TrajrepError, match=r"test does not exist; ImageFolder expects root/train/<class>"):
        ImageFolder(root=str(tmp_path))
    with pytest.raises(TrajrepError, match="does not exist"):
        ImageFolder(root=str(tmp_path / "nowhere"))


def test_balanced_subset_is_equal_per_class_seeded_and_in_dataset_order():
    labels = [0] * 50 + [1] * 30 + [2] * 4  # class-sorted, as an image folder lists its files
    chosen = balanced_subset(labels, 30, seed=0)
    assert chosen == sorted(chosen) and len(set(chosen)) == 30
    assert Counter(labels[i] for i in chosen) == {0: 13, 1: 13, 2: 4}  # the small class gives all it has
    assert balanced_subset(labels, 30, seed=0) == chosen and balanced_subset(labels, 30, seed=1) != chosen
    assert Counter(labels[i] for i in balanced_subset(labels, 7, seed=0)) == {0: 3, 1: 2, 2: 2}


def test_image_folder_subsets_are_class_balanced_and_part_of_the_identity(tmp_path):
    fake_image_folder(tmp_path)
    full = ImageFolder(root=str(tmp_path))
    subset = ImageFolder(root=str(tmp_path), num_train=4, num_test=2)
    assert tensors(subset.dataset("train"))[1].tolist() == [0, 0, 1, 1]
    assert sorted(tensors(subset.dataset("test"))[1].tolist()) == [0, 1]
    assert subset.identity() != full.identity()  # a different cache
    with pytest.raises(TrajrepError, match=r"num_train 7 exceeds the 6 train images"):
        ImageFolder(root=str(tmp_path), num_train=7).dataset("train")
    with pytest.raises(TrajrepError, match="num_test must be >= 1"):
        ImageFolder(root=str(tmp_path), num_test=0)


def test_image_folder_corrupted_file_is_named_when_read(tmp_path):
    fake_image_folder(tmp_path)
    broken = tmp_path / "train" / "dog" / "1.jpg"
    broken.write_bytes(broken.read_bytes()[:20])
    data = ImageFolder(root=str(tmp_path))
    dataset = data.dataset("train")
    assert dataset[0][0].shape == (3, 32, 32)  # other files still load
    with pytest.raises(TrajrepError, match=r"cannot read image .*dog/1\.jpg"):
        dataset[4]


def test_base_class_cannot_be_instantiated():
    with pytest.raises(TypeError):
        ImageDataModule()


# ---------------------------------------------------------------- coloured grey data

def test_coloured_fashion_has_three_tasks_and_colours_each_pixel(tmp_path):
    arrays = fake_fashion(tmp_path, num_train=40, num_test=30)
    data = Coloured(source=FashionMNIST(root=str(tmp_path)), seed=3)
    assert (data.image_shape, data.num_classes) == ((3, 32, 32), [10, 9, 9])
    assert data.task_names == ["class", "background", "foreground"]
    images, labels = tensors(data.dataset("train"))
    assert images.dtype == torch.uint8 and images.shape == (40, 3, 32, 32) and labels.shape == (40, 3)
    assert torch.equal(labels[:, 0], torch.from_numpy(arrays["train"][1]).long())
    assert (labels[:, 1] != labels[:, 2]).all() and labels[:, 1:].max() < 9
    background, foreground = PALETTE[labels[:, 1].numpy()], PALETTE[labels[:, 2].numpy()]
    assert (images[:, :, 0, 0].numpy() == background).all()  # the zero padding is pure background
    grey = torch.from_numpy(arrays["train"][0]).float()[:, None] / 255
    expected = grey * torch.from_numpy(foreground).float()[:, :, None, None] \
        + (1 - grey) * torch.from_numpy(background).float()[:, :, None, None]
    assert (images[:, :, 2:30, 2:30].float() - expected).abs().max() <= 0.5 + 1e-4


def test_coloured_draws_follow_the_seed_and_the_split(tmp_path):
    fake_fashion(tmp_path, num_train=60, num_test=60)
    source = FashionMNIST(root=str(tmp_path))

    def colours(seed, split):
        return tensors(Coloured(source=source, seed=seed).dataset(split))[1][:, 1:]

    assert torch.equal(colours(0, "train"), colours(0, "train"))
    assert not torch.equal(colours(0, "train"), colours(1, "train"))
    assert not torch.equal(colours(0, "train"), colours(0, "test"))
    assert Coloured(source=source, seed=0).identity() != Coloured(source=source, seed=1).identity()


def test_coloured_needs_a_grey_single_task_source():
    with pytest.raises(TrajrepError, match="grey single-task source"):
        Coloured(source=SyntheticShapes(num_train=64, num_test=48))


def test_coloured_fashion_trains_from_the_cli(tmp_path):
    (tmp_path / "fashion").mkdir()
    fake_fashion(tmp_path / "fashion", num_train=32, num_test=8)
    args = [arg for arg in tiny_fit_args(tmp_path / "run", 1) if not arg.startswith("--data.")]
    main(args + ["--data=Coloured", "--data.source=FashionMNIST", f"--data.source.root={tmp_path / 'fashion'}",
                 "--data.batch_size=8"])
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["image_channels"] == 3


# ---------------------------------------------------------------- CelebA (a generated stand-in, same layout)

def fake_celeba(root: pathlib.Path, attributes=("Smiling", "Young", "Bald")) -> dict[str, list]:
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows, partition, labels = [], [], {"train": [], "test": []}
    for i in range(12):
        name = f"{i:06d}.jpg"
        Image.new("RGB", (178, 218), tuple(int(v) for v in rng.integers(0, 256, 3))).save(
            folder / "img_align_celeba" / name)
        values = rng.choice([-1, 1], size=len(attributes)).tolist()
        rows.append(f"{name} " + " ".join(f"{v:2d}" for v in values))
        split = "0" if i < 6 else ("1" if i < 8 else "2")
        partition.append(f"{name} {split}")
        if split != "1":
            labels["train" if split == "0" else "test"].append([int(v == 1) for v in values])
    (folder / "list_attr_celeba.txt").write_text("\n".join([str(len(rows)), " ".join(attributes), *rows]) + "\n")
    (folder / "list_eval_partition.txt").write_text("\n".join(partition) + "\n")
    return labels


def test_celeba_reads_torchvisions_layout_with_one_task_per_attribute(tmp_path):
    labels = fake_celeba(tmp_path)
    data = CelebA(root=str(tmp_path), image_size=16)
    assert data.image_shape == (3, 16, 16) and data.num_classes == [2, 2, 2]
    assert data.task_names == ["Smiling", "Young", "Bald"]
    for split, count in (("train", 6), ("test", 4)):  # the official validation partition (1) is not used
        dataset = data.dataset(split)
        assert len(dataset) == count
        image, label = dataset[0]
        assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)
        assert [dataset[i][1].tolist() for i in range(count)] == labels[split]


def test_celeba_missing_files_and_bad_lines_are_named(tmp_path):
    with pytest.raises(TrajrepError, match="lacks img_align_celeba, list_attr_celeba.txt"):
        CelebA(root=str(tmp_path))
    fake_celeba(tmp_path)
    attributes = tmp_path / "celeba" / "list_attr_celeba.txt"
    attributes.write_text(attributes.read_text().replace(" 1", " 7", 1))
    with pytest.raises(TrajrepError, match=r"line \d+ is not"):
        CelebA(root=str(tmp_path), image_size=16).dataset("train")
