"""On-disk representation cache: one .npy array per (split, t), labels, and a JSON manifest with checksums. A cache
of denoiser features has a layer axis: one array per (split, layer, t), each layer as wide as its block.

A cache folder is named by its key, a hash of everything that determines its content, so a changed checkpoint,
grid, dataset or format can never be read by mistake. It is written to a hidden partial folder and renamed into
place only when complete, so a killed run never leaves a cache that looks finished. No pickle anywhere.
"""

import datetime
import errno
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap

from trajrep.checks import ensure_writable
from trajrep.disk import ensure_free_space, no_space
from trajrep.errors import TrajrepError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = ("float16", "float32")


def tensor_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and bytes: the identity of the weights actually extracted."""
    digest = hashlib.sha256()
    for name in sorted(state):
        value = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(identity: dict) -> str:
    """Content address of a cache: hash of the canonical JSON of everything that determines it."""
    canonical = json.dumps({"format_version": FORMAT_VERSION, **identity}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def time_file(split: str, index: int, layer: int | None = None) -> str:
    return f"{split}/t{index:03d}.npy" if layer is None else f"{split}/l{layer:02d}/t{index:03d}.npy"


def label_file(split: str) -> str:
    return f"{split}/labels.npy"


def reserve(path: Path) -> None:
    """Give a freshly created (sparse) array file its blocks now: a full disk then fails here with ENOSPC rather
    than as a SIGBUS ('Bus error') at the first write through the memory map."""
    with open(path, "r+b") as file:
        os.posix_fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)


@contextmanager
def cache_lock(cache_dir: Path, key: str) -> Iterator[None]:
    """Exclusive lock per key, so two processes asking for the same cache build it once and never interleave."""
    ensure_writable(cache_dir, "cache_dir")
    with open(cache_dir / f".{key}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class CacheWriter:
    """Preallocates the arrays of one cache in a partial folder; rows can be written by several processes.
    `layers` (names, with one width each in `feature_dim`) gives the cache a layer axis."""

    def __init__(self, path: Path, manifest: dict, split_sizes: dict[str, int], label_shapes: dict[str, tuple],
                 times: list[float], feature_dim: int | list[int], dtype: str, layers: list[str] | None = None
                 ) -> None:
        if dtype not in DTYPES:
            raise TrajrepError(f"cache dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.path = Path(path)
        self.partial = self.path.parent / f".{self.path.name}.partial"
        self.manifest = manifest
        self.split_sizes = split_sizes
        self.label_shapes = label_shapes
        self.times = times
        self.feature_dim = feature_dim
        self.layers = layers
        # (layer index or None, width) of every array of a split and t
        self._widths = [(None, feature_dim)] if layers is None else list(enumerate(feature_dim))
        if layers is not None and len(layers) != len(feature_dim):
            raise ValueError(f"{len(layers)} layers but {len(feature_dim)} widths")
        self.dtype = dtype
        self._arrays: dict[str, np.ndarray] = {}

    def allocate(self) -> None:
        """Create the partial folder with zero-filled arrays (one process only, before any write)."""
        if self.partial.exists():
            shutil.rmtree(self.partial)
        ensure_free_space(self.partial.parent, self.num_bytes(), "representation cache")
        try:
            for split, size in self.split_sizes.items():
                (self.partial / split).mkdir(parents=True)
                arrays = [(time_file(split, i, layer), self.dtype, (size, width))
                          for layer, width in self._widths for i in range(len(self.times))]
                for name, dtype, shape in [*arrays, (label_file(split), np.int64, (size, *self.label_shapes[split]))]:
                    (self.partial / name).parent.mkdir(parents=True, exist_ok=True)
                    open_memmap(self.partial / name, "w+", dtype, shape).flush()
                    reserve(self.partial / name)
        except OSError as error:
            shutil.rmtree(self.partial, ignore_errors=True)
            if error.errno == errno.ENOSPC:
                raise no_space("representation cache", self.partial.parent, self.num_bytes()) from None
            raise

    def num_bytes(self) -> int:
        """The size of the arrays on disk (headers aside)."""
        itemsize = np.dtype(self.dtype).itemsize
        width = sum(width for _, width in self._widths)
        return sum(size * (len(self.times) * width * itemsize + 8 * int(np.prod(self.label_shapes[split])))
                   for split, size in self.split_sizes.items())

    def open(self) -> None:
        """Map the preallocated arrays for writing (every process)."""
        for split in self.split_sizes:
            for layer, _ in self._widths:
                for i in range(len(self.times)):
                    name = time_file(split, i, layer)
                    self._arrays[name] = np.load(self.partial / name, mmap_mode="r+")
            self._arrays[label_file(split)] = np.load(self.partial / label_file(split), mmap_mode="r+")

    def write(self, split: str, rows: np.ndarray, representations: np.ndarray | list[np.ndarray],
              labels: np.ndarray) -> None:
        """Write rows of a split: representations (B, T, d) (a cache with layers: one such array per layer),
        labels (B, *label_shape)."""
        per_layer = representations if self.layers is not None else [representations]
        for (layer, _), values in zip(self._widths, per_layer, strict=True):
            for i in range(len(self.times)):
                self._arrays[time_file(split, i, layer)][rows] = values[:, i]
        self._arrays[label_file(split)][rows] = labels

    def finalize(self) -> Path:
        """Checksum every array, write the manifest and rename the folder into place (one process, after all writes)."""
        for array in self._arrays.values():
            array.flush()
        self._arrays.clear()
        files = sorted(str(p.relative_to(self.partial)) for p in self.partial.rglob("*.npy"))
        manifest = {
            **self.manifest,
            "format_version": FORMAT_VERSION,
            "times": self.times,
            "feature_dim": self.feature_dim,
            **({} if self.layers is None else {"layers": self.layers}),
            "dtype": self.dtype,
            "splits": {split: {"num_examples": size, "label_shape": list(self.label_shapes[split])}
                       for split, size in self.split_sizes.items()},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "checksums": {name: file_sha256(self.partial / name) for name in files},
        }
        (self.partial / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self.partial, self.path)
        return self.path


class RepresentationCache:
    """Reads a finished cache; every array is checked against its checksum before use."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise TrajrepError(f"no representation cache at {self.path} (missing {MANIFEST}); run `trajrep extract` "
                               "or a probe command (`trajrep fit` builds the cache its data needs)")
        self.manifest = json.loads(manifest_path.read_text())
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise TrajrepError(f"cache {self.path} has format version {version}, this trajrep reads version "
                               f"{FORMAT_VERSION}; delete the folder and extract again (or pass recompute: true)")

    @property
    def times(self) -> list[float]:
        return self.manifest["times"]

    @property
    def feature_dim(self) -> int | list[int]:
        """The width of every t (a cache with layers: a list, one width per layer)."""
        return self.manifest["feature_dim"]

    @property
    def layers(self) -> list[str] | None:
        return self.manifest.get("layers")

    def layer_index(self, name: str) -> int:
        if self.layers is None or name not in self.layers:
            raise TrajrepError(f"cache {self.path} has no layer {name!r}; its layers are {self.layers}")
        return self.layers.index(name)

    def num_examples(self, split: str) -> int:
        return self.manifest["splits"][split]["num_examples"]

    def _load(self, name: str) -> np.ndarray:
        path = self.path / name
        expected = self.manifest["checksums"].get(name)
        if expected is None or not path.is_file() or file_sha256(path) != expected:
            raise TrajrepError(f"cache file {path} is missing, truncated or modified (checksum mismatch); delete "
                               f"{self.path} and extract again, or pass recompute: true")
        return np.load(path, mmap_mode="r", allow_pickle=False)

    def representations(self, split: str, time_indices: list[int], layer: str | None = None) -> np.ndarray:
        """Array (N, T, d) of the given cached time indices, in that order (of one named layer, in a cache with
        layers)."""
        if split not in self.manifest["splits"]:
            raise TrajrepError(f"split {split!r} is not in cache {self.path}; it has {list(self.manifest['splits'])}")
        index = None if layer is None and self.layers is None else self.layer_index(str(layer))
        return np.stack([self._load(time_file(split, i, index)) for i in time_indices], axis=1)

    def labels(self, split: str) -> np.ndarray:
        return np.array(self._load(label_file(split)))
