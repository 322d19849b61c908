"""A full disk: every file trajrep writes (checkpoint, cache, result) is complete or absent, and the error is one
line saying what needed how much, where. The disk is filled by mocking (free space, or ENOSPC from the write)."""

import errno
import json
import shutil
from collections import namedtuple

import pytest
import torch

from conftest import tiny_fit_args
from trajrep import disk
from trajrep.cli import main
from trajrep.data.cache import CacheWriter
from trajrep.errors import TrajrepError
from trajrep.probe.records import read_results, write_results

Usage = namedtuple("Usage", "total used free")


def fill_disk(monkeypatch, free: int = 1000) -> None:
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda folder: Usage(10**9, 10**9 - free, free))


def fail_writes_with_enospc(monkeypatch) -> None:
    def no_space(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(disk.os, "fsync", no_space)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_partial(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"the complete earlier checkpoint")
    fail_writes_with_enospc(monkeypatch)
    with pytest.raises(TrajrepError, match=r"no space left for the checkpoint in .*: it needs 0.0 MB"):
        disk.atomic_write_bytes(target, b"x" * 100, "checkpoint")
    assert target.read_bytes() == b"the complete earlier checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_pretraining_on_a_full_disk_is_one_line_and_leaves_no_checkpoint(tmp_path, monkeypatch, capsys):
    fill_disk(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_fit_args(tmp_path, 2))
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("trajrep: error")]
    assert len(lines) == 1 and "no space left for the checkpoint epoch=0-step=1.ckpt" in lines[0]
    assert "MB are free" in lines[0] and str(tmp_path / "checkpoints") in lines[0]
    assert not list((tmp_path / "checkpoints").iterdir())


def test_pretraining_checkpoints_are_written_whole(tmp_path):
    main(tiny_fit_args(tmp_path, 2))
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert not list((tmp_path / "checkpoints").glob(".*partial"))


def writer(tmp_path) -> CacheWriter:
    return CacheWriter(tmp_path / "key", {}, {"train": 50, "test": 20}, {"train": (), "test": ()}, [0.0, 1.0], 8,
                       "float32")


def test_a_cache_that_does_not_fit_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    cache = writer(tmp_path)
    assert cache.num_bytes() == 70 * (2 * 8 * 4 + 8)
    fill_disk(monkeypatch, free=cache.num_bytes() - 1)
    with pytest.raises(TrajrepError, match="no space left for the representation cache"):
        cache.allocate()
    assert not list(tmp_path.iterdir())


def test_a_cache_whose_blocks_cannot_be_reserved_leaves_no_partial_folder(tmp_path, monkeypatch):
    def no_space(descriptor, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("trajrep.data.cache.os.posix_fallocate", no_space)
    with pytest.raises(TrajrepError, match="no space left for the representation cache"):
        writer(tmp_path).allocate()
    assert not list(tmp_path.iterdir())


def test_result_files_are_whole_or_absent(tmp_path, monkeypatch):
    context = {"probe": "mlp", "cache_key": "abc"}
    path = write_results(tmp_path, [{"lr": 0.1}], {}, context)
    assert read_results(path)["records"][0]["lr"] == 0.1
    before = path.read_text()
    fail_writes_with_enospc(monkeypatch)
    with pytest.raises(TrajrepError, match="no space left for the probe results"):
        write_results(tmp_path, [{"lr": 0.2}], {}, context, overwrite=True)
    assert path.read_text() == before and json.loads(before)["records"][0]["lr"] == 0.1
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_free_space_is_read_from_the_folder_written_to(tmp_path):
    assert shutil.disk_usage(tmp_path).free > 0  # the real call the mocks above replace
    disk.ensure_free_space(tmp_path, 1, "file")
    with pytest.raises(TrajrepError, match="no space left for the file"):
        disk.ensure_free_space(tmp_path, shutil.disk_usage(tmp_path).total * 2, "file")
