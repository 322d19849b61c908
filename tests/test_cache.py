"""Representation cache: extraction through the CLI, reuse, keys, integrity, crash safety and DDP equality."""

import json
import os
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import QUICKSTART, REPO
from trajrep.cli import main
from trajrep.lightning_cli import build_cli
from trajrep.data import ImageFolder
from trajrep.data.cache import FORMAT_VERSION, RepresentationCache
from trajrep.data.representations import RepresentationDataModule
from trajrep.data.synthetic import SyntheticShapes
from trajrep.errors import TrajrepError
from trajrep.extract import CacheRowWriter, Extractor, build_cache, load_pretrained_model, load_pretrained_weights
from trajrep.pretrain.module import PretrainModule

TINY_DATA = ["--data.init_args.num_train=64", "--data.init_args.num_test=48"]
TINY_MODEL = ["--model.init_args.nf=8", "--model.init_args.widen_factor=0.125"]


def extract(ckpt: pathlib.Path, cache_dir: pathlib.Path, *extra: str) -> pathlib.Path:
    main(["extract", "--config", str(REPO / QUICKSTART), *TINY_DATA, *TINY_MODEL, "--ckpt_path", str(ckpt),
          "--granularities=[2]", f"--cache_dir={cache_dir}", "--batch_size=16", "--trainer.logger=false",
          f"--trainer.default_root_dir={cache_dir}",
          "--trainer.enable_progress_bar=false", *extra])
    (path,) = [p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return path


@pytest.fixture(scope="module")
def cache(tiny_checkpoint, tmp_path_factory) -> pathlib.Path:
    return extract(tiny_checkpoint, tmp_path_factory.mktemp("cache"))


def test_cache_matches_direct_encoder_computation(cache, tiny_checkpoint):
    reader = RepresentationCache(cache)
    assert reader.times == [0.0, 0.5, 1.0]
    model = load_pretrained_model(tiny_checkpoint, ema=False)
    images = SyntheticShapes(num_train=64, num_test=48)
    x, y = zip(*(images.dataset("test")[i] for i in range(5)))
    x0 = images.normalize(torch.stack(x))
    reps = reader.representations("test", [0, 1, 2])
    assert reps.shape == (48, 3, model.latent_dim)
    with torch.no_grad():
        for i, t in enumerate(reader.times):
            direct = model.encoder.representation(x0, model.sde.log_sigma(torch.full((5,), t)))
            np.testing.assert_allclose(reps[:5, i], direct.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(reader.labels("test")[:5], torch.stack(y).numpy())
    assert reader.labels("train").shape == (64, 4)  # labels keep their (tasks) shape


def test_manifest_describes_the_cache(cache):
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["key"] == cache.name and manifest["format_version"] == FORMAT_VERSION
    assert manifest["weights"] == "raw" and manifest["representation"] == "feature"
    assert manifest["sigmas"][0] == pytest.approx(0.01) and manifest["sigmas"][-1] == pytest.approx(50.0)
    assert manifest["splits"]["train"] == {"num_examples": 64, "label_shape": [4]}
    assert set(manifest["checksums"]) == {f"{s}/{n}.npy" for s in ("train", "test")
                                          for n in ("t000", "t001", "t002", "labels")}


def test_second_request_reuses_the_cache_without_running_the_encoder(cache, tiny_checkpoint, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the encoder ran although the cache exists")

    monkeypatch.setattr(Extractor, "forward", fail)
    assert extract(tiny_checkpoint, cache.parent) == cache


def test_changed_grid_dataset_or_weights_give_a_new_key(cache, tiny_checkpoint, tmp_path):
    def key_of(**changes):
        kwargs = dict(checkpoint=str(tiny_checkpoint), images=SyntheticShapes(num_train=64, num_test=48),
                      granularities=[2], cache_dir=str(cache.parent))
        kwargs.update(changes)
        return RepresentationDataModule(**kwargs).cache_path.name

    assert key_of() == cache.name
    assert key_of(granularities=[4]) != cache.name
    assert key_of(images=SyntheticShapes(num_train=64, num_test=48, seed=1)) != cache.name
    assert key_of(ema=True) != cache.name
    assert key_of(dtype="float16") != cache.name
    state = torch.load(tiny_checkpoint, weights_only=True)
    first = next(k for k in state["current_model_state"] if k.startswith("encoder.") and "weight" in k)
    state["current_model_state"][first] += 1.0
    torch.save(state, tmp_path / "changed.ckpt")
    assert key_of(checkpoint=str(tmp_path / "changed.ckpt")) != cache.name


def test_replaced_image_files_give_a_new_key_and_unchanged_ones_the_same(tiny_checkpoint, tmp_path):
    for split in ("train", "test"):
        for label in ("cat", "dog"):
            (tmp_path / "images" / split / label).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (32, 32), (40 * i, 120, 200)).save(tmp_path / "images" / split / label / f"{i}.png")

    def key() -> str:
        images = ImageFolder(root=str(tmp_path / "images"), image_size=32)
        return RepresentationDataModule(checkpoint=str(tiny_checkpoint), images=images, granularities=[2],
                                        cache_dir=str(tmp_path / "cache")).cache_path.name

    keys = [key()]
    assert key() == keys[0]
    touched = tmp_path / "images" / "train" / "cat" / "0.png"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))  # same bytes, new time
    keys.append(key())
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "test" / "dog" / "2.png")  # one more image
    keys.append(key())
    (tmp_path / "images" / "train" / "dog" / "1.png").unlink()  # one fewer
    keys.append(key())
    for image in (tmp_path / "images").rglob("*.png"):
        Image.new("RGB", (32, 32)).save(image)  # every image black, same names
    keys.append(key())
    assert len(set(keys)) == len(keys)


def test_edited_or_truncated_arrays_are_detected(cache, tmp_path):
    import shutil

    copy = tmp_path / cache.name
    shutil.copytree(cache, copy)
    array = copy / "train" / "t001.npy"
    data = bytearray(array.read_bytes())
    data[-1] ^= 0xFF
    array.write_bytes(bytes(data))
    with pytest.raises(TrajrepError, match="t001.npy is missing, truncated or modified"):
        RepresentationCache(copy).representations("train", [1])
    (copy / "test" / "labels.npy").write_bytes(b"\x93NUMPY")
    with pytest.raises(TrajrepError, match="labels.npy"):
        RepresentationCache(copy).labels("test")


def test_other_format_version_is_refused(cache, tmp_path):
    import shutil

    copy = tmp_path / cache.name
    shutil.copytree(cache, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrajrepError, match="format version"):
        RepresentationCache(copy)


def test_crashed_extraction_leaves_no_complete_looking_cache(tiny_checkpoint, tmp_path, monkeypatch):
    original = CacheRowWriter.write_on_batch_end
    calls = []

    def crash_on_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a kill looks like from inside the loop
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CacheRowWriter, "write_on_batch_end", crash_on_second_batch)
    with pytest.raises(BaseException):
        extract(tiny_checkpoint, tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    monkeypatch.setattr(CacheRowWriter, "write_on_batch_end", original)
    path = extract(tiny_checkpoint, tmp_path)
    assert RepresentationCache(path).representations("train", [0]).shape[0] == 64


def test_checkpoint_from_another_architecture_is_a_clear_error(tiny_checkpoint):
    # The CLI rebuilds the model from the checkpoint's own hyperparameters; a model built otherwise must not load.
    other = PretrainModule(image_channels=3, image_size=32, encoder_depth=10, widen_factor=0.25, nf=8,
                           ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,))
    with pytest.raises(TrajrepError, match="does not match the model in the config"):
        load_pretrained_weights(other, tiny_checkpoint, ema=False)


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        extract(tmp_path / "missing.ckpt", tmp_path)
    err = capsys.readouterr().err
    assert "missing.ckpt does not exist" in err and "Traceback" not in err


def test_datamodule_reads_a_cache_that_the_extraction_stage_builds(tiny_checkpoint, tmp_path):
    data = RepresentationDataModule(str(tiny_checkpoint), SyntheticShapes(num_train=64, num_test=48),
                                    granularities=[4], probe_times=[0.25, 0.75], cache_dir=str(tmp_path),
                                    extract_batch_size=32, val_fraction=0.25, standardize=False)
    assert (data.num_times, data.num_classes) == (2, [9, 9, 16, 5])
    assert not data.cache_path.exists() and not data.cache_ready
    with pytest.raises(TrajrepError, match="is not built yet.*build_cache"):
        data.probe_spec
    build_cache(data)
    assert data.feature_dim == 8 and data.probe_spec["feature_dim"] == 8
    train_x, train_y = data.tensors("train")
    val_x, _ = data.tensors("val")
    test_x, test_y = data.tensors("test")
    assert train_x.shape == (48, 2, 8) and val_x.shape == (16, 2, 8) and test_x.shape == (48, 2, 8)
    assert train_y.shape == (48, 4) and test_y.shape == (48, 4)
    full = RepresentationCache(data.cache_path).representations("test", [1, 3])
    np.testing.assert_array_equal(test_x.numpy(), full)  # raw representations: standardize is off
    # The split is fixed by split_seed: a second datamodule sees the same validation rows.
    again = RepresentationDataModule(str(tiny_checkpoint), SyntheticShapes(num_train=64, num_test=48),
                                     granularities=[4], probe_times=[0.25, 0.75], cache_dir=str(tmp_path),
                                     val_fraction=0.25, standardize=False)
    assert torch.equal(again.tensors("val")[0], val_x)


@pytest.mark.slow
def test_ddp_extraction_equals_single_process_bit_for_bit(cache, tiny_checkpoint, tmp_path):
    path = extract(tiny_checkpoint, tmp_path, "--trainer.accelerator=cpu", "--trainer.devices=2",
                   "--trainer.strategy=ddp_spawn")
    assert path.name == cache.name
    single, ddp = RepresentationCache(cache), RepresentationCache(path)
    for split in ("train", "test"):
        np.testing.assert_array_equal(single.representations(split, [0, 1, 2]), ddp.representations(split, [0, 1, 2]))
        np.testing.assert_array_equal(single.labels(split), ddp.labels(split))


@pytest.mark.slow
def test_a_probe_command_extracts_a_missing_cache_with_its_own_devices_and_strategy_in_full_precision(
        cache, tiny_checkpoint, tmp_path, monkeypatch):
    import trajrep.extract

    used, write_cache = [], trajrep.extract.write_cache

    def noting_the_trainer(trainer, *args, **kwargs):
        used.append((trainer.num_devices, type(trainer.strategy).__name__, trainer.precision))
        return write_cache(trainer, *args, **kwargs)

    monkeypatch.setattr(trajrep.extract, "write_cache", noting_the_trainer)
    images = {"class_path": "SyntheticShapes", "init_args": {"num_train": 64, "num_test": 48}}
    cli = build_cli(["--config", str(REPO / "configs" / "probe" / "linear.yaml"),
                     "--data=RepresentationDataModule", f"--data.checkpoint={tiny_checkpoint}",
                     f"--data.images={json.dumps(images)}", "--data.granularities=[2]", f"--data.cache_dir={tmp_path}",
                     "--data.extract_batch_size=16", "--trainer.accelerator=cpu", "--trainer.devices=2",
                     "--trainer.strategy=ddp_spawn", "--trainer.precision=bf16-mixed", "--trainer.logger=false",
                     f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"], run=False)
    assert used == [(2, "DDPStrategy", "32-true")]
    assert cli.datamodule.cache_path.name == cache.name and cli.model.hparams.feature_dim == 8
    for split in ("train", "test"):
        np.testing.assert_array_equal(RepresentationCache(cli.datamodule.cache_path).representations(split, [0, 2]),
                                      RepresentationCache(cache).representations(split, [0, 2]))


def test_extraction_under_mixed_precision_writes_the_full_precision_cache_and_half_weights_are_refused(
        cache, tiny_checkpoint, tmp_path, capsys):
    path = extract(tiny_checkpoint, tmp_path / "mixed", "--trainer.precision=bf16-mixed")
    assert path.name == cache.name
    np.testing.assert_array_equal(RepresentationCache(path).representations("test", [0, 1, 2]),
                                  RepresentationCache(cache).representations("test", [0, 1, 2]))
    with pytest.raises(SystemExit):
        extract(tiny_checkpoint, tmp_path / "half", "--trainer.precision=bf16-true")
    assert "pass --trainer.precision=32-true" in capsys.readouterr().err


def test_checkpoints_name_the_model_by_the_path_they_had_before_the_pretrain_package(tiny_checkpoint):
    # The CLI rebuilds the model from the recorded path (--ckpt_path), so older checkpoints must keep resolving.
    assert torch.load(tiny_checkpoint, weights_only=True)["hyper_parameters"]["_class_path"] == \
        "trajrep.pretrain.PretrainModule"
