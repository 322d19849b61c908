"""Files that are complete or absent: writes to a temporary name in the same folder and renamed into place, free
space checked before large writes, and a full disk reported in one line (what, where, how much) instead of a
traceback and a truncated file under its final name."""

import errno
import io
import os
import shutil
from pathlib import Path

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from trajrep.errors import TrajrepError


def megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def no_space(what: str, folder: Path, needed: int) -> TrajrepError:
    free = shutil.disk_usage(folder).free
    return TrajrepError(f"no space left for the {what} in {folder}: it needs {megabytes(needed)}, {megabytes(free)} "
                        "are free; free some space or write it elsewhere")


def ensure_free_space(folder: str | Path, needed: int, what: str) -> None:
    """Refuse, before anything is written, a write of `needed` bytes into a folder that cannot hold it."""
    folder = Path(folder)
    if shutil.disk_usage(folder).free < needed:
        raise no_space(what, folder, needed)


def atomic_write_bytes(path: str | Path, data: bytes, what: str) -> None:
    """`data` at `path`, or nothing there: a temporary file beside it, flushed to disk, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ensure_free_space(path.parent, len(data), what)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        if error.errno == errno.ENOSPC:
            raise no_space(what, path.parent, len(data)) from None
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch.save checkpoints, written atomically into their own folder (Lightning's own transaction
    writes a temporary file elsewhere and copies it, which leaves a truncated file under the final name when the
    disk fills)."""

    def save_checkpoint(self, checkpoint: dict, path: _PATH, storage_options=None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(path, buffer.getvalue(), f"checkpoint {Path(path).name}")
