"""RepresentationDataModule: serves cached E(x0, t) of shape (N, T, d) to the probes; it reads caches and
checkpoint files, and never builds a model (the extraction stage builds a missing cache, trajrep.extract)."""

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from trajrep.data.base import ImageDataModule
from trajrep.data.cache import RepresentationCache, cache_key
from trajrep.data.identity import checkpoint_source
from trajrep.errors import TrajrepError
from trajrep.similarity import linear_cka
from trajrep.timegrid import build_time_grid, select_times

STAGES = ("train", "val", "test")


class SeededBatches(IterableDataset):
    """Mini-batches for a grid of probes: step k gives every seed its own k-th batch, shape (S, B, ...).

    Seed s shuffles with its own generator, so each probe seed sees the batch order it would see alone.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, seeds: list[int], batch_size: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        orders = torch.stack([torch.randperm(len(self.x), generator=g) for g in self.generators])
        for start in range(0, len(self.x), self.batch_size):
            rows = orders[:, start:start + self.batch_size]
            yield self.x[rows], self.y[rows]


class ProbeData(pl.LightningDataModule):
    """What a probe grid reads: representations (N, T, d) and labels per stage (train, val, test).

    Training batches come per probe seed (SeededBatches); validation runs on the val AND test splits, because
    the protocol keeps every epoch's test accuracy and then selects on validation. `from_tensors` serves
    tensors held in memory; RepresentationDataModule reads them from a cache.

    `standardize` (the default) rescales every dimension at every t to mean 0 and std 1 with statistics of the
    train stage only, so that probes of encoders whose features differ in scale (or barely vary between images)
    train alike; false serves the raw representations, as the paper did. `replicate_time` serves the
    representation at that t in every position: the capacity control of the mixers, which then see no information
    from other times.
    """

    def __init__(self, times: list[float], num_classes: list[int], task_names: list[str], feature_dim: int,
                 seeds: list[int], batch_size: int, eval_batch_size: int, standardize: bool = True,
                 replicate_time: float | None = None) -> None:
        super().__init__()
        if not seeds or len(set(seeds)) != len(seeds):
            raise TrajrepError(f"seeds must be a non-empty list of distinct probe seeds, got {seeds}")
        if batch_size < 1 or eval_batch_size < 1:
            raise TrajrepError(f"batch sizes must be >= 1, got {batch_size} and {eval_batch_size}")
        self.times, self.num_classes, self.task_names = list(times), list(num_classes), list(task_names)
        self.feature_dim, self.seeds = feature_dim, list(seeds)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.standardize = standardize
        self.replicated_index = None if replicate_time is None else select_times(self.times, [replicate_time])[0]
        self.metadata: dict = {"standardized": standardize,
                               **({} if replicate_time is None else {"replicated_time": replicate_time})}
        self._tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._given: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._batches: SeededBatches | None = None
        self._resumed_shuffles: list[torch.Tensor] = []  # from a checkpoint: the generators' states to go on from

    @classmethod
    def from_tensors(cls, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]], times: list[float],
                     num_classes: list[int], seeds: list[int], batch_size: int = 256,
                     eval_batch_size: int = 1024, task_names: list[str] | None = None, standardize: bool = True,
                     replicate_time: float | None = None) -> "ProbeData":
        """Serve in-memory tensors {stage: (x (N, T, d), y)} for train, val and test."""
        data = ProbeData(times, num_classes, task_names or [f"task{k}" for k in range(len(num_classes))],
                         tensors["train"][0].shape[-1], seeds, batch_size, eval_batch_size, standardize,
                         replicate_time)
        data._given = dict(tensors)
        return data

    def load_stages(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The raw {train, val, test: (x (N, T, d), y)}; subclasses read them from where they live."""
        return self._given

    def setup(self, stage: str) -> None:
        if self._tensors:
            return
        stages = self.load_stages()
        if self.standardize:
            stages = standardize_stages(stages)
        if self.replicated_index is not None:
            positions = [self.replicated_index] * len(self.times)
            stages = {name: (x[:, positions], y) for name, (x, y) in stages.items()}
        self._tensors = stages

    @property
    def num_times(self) -> int:
        return len(self.times)

    @property
    def probe_spec(self) -> dict:
        """What a ProbeModule must know about the data; the CLI links each entry to the model argument of that name.

        Image datamodules have no `probe_spec`, so these links never reach a pretraining model.
        """
        return {"num_classes": self.num_classes, "task_names": self.task_names, "feature_dim": self.feature_dim,
                "times": self.times, "seeds": self.seeds}

    def tensors(self, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(representations (N, T, d) float32, labels (N,) or (N, tasks)) of one stage: train, val or test."""
        if stage not in STAGES:
            raise TrajrepError(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
        self.setup("fit")
        x, y = self._tensors[stage]
        self._check_labels(stage, y)
        return x, y

    def _check_labels(self, stage: str, labels: torch.Tensor) -> None:
        """Labels must have one column per task and values below each task's class count."""
        per_task = labels.reshape(len(labels), -1)
        if per_task.shape[1] != len(self.num_classes):
            raise TrajrepError(f"the {stage} labels have {per_task.shape[1]} task(s) but the data describes "
                               f"{len(self.num_classes)} (num_classes {self.num_classes}); the cache and the image "
                               "datamodule disagree: rebuild the cache with recompute: true")
        if not per_task.numel():
            return
        too_big = per_task.max(dim=0).values >= torch.tensor(self.num_classes, device=per_task.device)
        if too_big.any() or per_task.min() < 0:
            raise TrajrepError(f"the {stage} labels fall outside 0..classes-1 for task(s) "
                               f"{[n for n, bad in zip(self.task_names, too_big) if bad] or self.task_names} "
                               f"(num_classes {self.num_classes}); the cache and the image datamodule disagree: "
                               "rebuild the cache with recompute: true")

    def _eval_loader(self, stage: str) -> DataLoader:
        return DataLoader(TensorDataset(*self.tensors(stage)), batch_size=self.eval_batch_size)

    def train_dataloader(self) -> DataLoader:
        self._batches = SeededBatches(*self.tensors("train"), self.seeds, self.batch_size)
        for generator, state in zip(self._batches.generators, self._resumed_shuffles):
            generator.set_state(state)
        return DataLoader(self._batches, batch_size=None)

    def state_dict(self) -> dict[str, Any]:
        """Where each probe seed's shuffling stands, so that a grid resumed from a checkpoint sees the batches of a
        straight one."""
        if self._batches is None:
            return {}
        return {"shuffles": [generator.get_state() for generator in self._batches.generators]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resumed_shuffles = state_dict.get("shuffles", [])

    def val_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader("val"), self._eval_loader("test")]

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")


class RepresentationDataModule(ProbeData):
    """Cached representations of a pretrained encoder on an image dataset; with `source: denoiser`, the pooled
    outputs of a diffusion model's blocks at x_t instead (trajrep.denoiser), one block (`layer`) served at a time,
    or, with `layer_tokens`, every block at every t as one sequence (N, blocks x T, widest block's width): block by
    block, each zero-padded to the widest (a padded dimension is 0 for every image, so no probe reads anything
    from it), its times repeated per block. That sequence is what the Transformer over (layer, t) reads.

    The cache is keyed by the extracted weights (read from the checkpoint file), the time grid, the dataset and the
    format, so it is rebuilt whenever one of them changes and reused otherwise. This module only reads: a missing
    cache (`cache_ready` false) is built by the extraction stage (`trajrep.extract.build_cache`, which the CLI runs
    with the command's own Trainer settings before the model is built), and `feature_dim` then comes from the
    cache's manifest, for the CLI's argument links. The train/validation split of the official
    training set is fixed by `split_seed`, identical for every probe. `dataset_name` is what tables and figures
    call the data (a preset passes its dataset's name); by default the image datamodule's class name.

    Args:
        checkpoint: the .ckpt written by `trajrep fit`; with source denoiser also a diffusers model folder.
        images: the image datamodule the encoder reads (as in pretraining).
        source: encoder (E(x0, t)) or denoiser (block outputs of the score network at x_t).
        blocks: denoiser: the blocks to cache (`trajrep extract --list_layers true` names them).
        layer: denoiser: the block the probes read (default: the first of `blocks`).
        layer_selection: denoiser: how `layer` was chosen (e.g. by the MLP's validation accuracy over blocks), put
            in the records: tables then show the probe in the encoder's own row, not in the block's row.
        layer_tokens: denoiser: serve every cached block at every t as tokens (the Transformer over (layer, t)).
        draws: denoiser: noise draws averaged per image and t.
        noise_seed: denoiser: the seed of the forward-process noise.
        times: explicit t of the cached grid.
        granularities: grids {0, 1/g, ..., 1} added to the times (the paper's g).
        probe_times: serve only these t of the grid; None serves all.
        ema: extract the EMA weights instead of the raw ones.
        dtype: storage type of the cache.
        cache_dir: folder of the caches (one subfolder per key).
        extract_batch_size: images per extraction batch.
        val_fraction: share of the official training split held out for selection.
        split_seed: the draw of the validation split.
        seeds: the probe seeds (each lr is trained once per seed).
        batch_size: training batch of the probes.
        eval_batch_size: batch of validation and test passes.
        recompute: rebuild the cache even when it exists.
        standardize: scale every dimension at every t to mean 0, std 1 (train statistics).
        replicate_time: serve the representation at this t in every position (the mixers' capacity control).
        dataset_name: the data's name in tables and figures.
    """

    def __init__(
        self,
        checkpoint: str,
        images: ImageDataModule,
        source: Literal["encoder", "denoiser"] = "encoder",
        blocks: list[str] | None = None,
        layer: str | None = None,
        layer_selection: str | None = None,
        layer_tokens: bool = False,
        draws: int = 1,
        noise_seed: int = 0,
        times: list[float] | None = None,
        granularities: list[int] | None = None,
        probe_times: list[float] | None = None,
        ema: bool = False,
        dtype: Literal["float16", "float32"] = "float32",
        cache_dir: str = "cache",
        extract_batch_size: int = 64,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        seeds: list[int] = [0, 1, 2, 3, 4],
        batch_size: int = 256,
        eval_batch_size: int = 1024,
        recompute: bool = False,
        standardize: bool = True,
        replicate_time: float | None = None,
        dataset_name: str | None = None,
    ) -> None:
        check_val_fraction(val_fraction)
        if source != "denoiser" and (layer_tokens or layer_selection or layer or blocks):
            raise TrajrepError("blocks, layer, layer_selection and layer_tokens name blocks of a denoiser: set "
                               "source: denoiser, or leave them out for an encoder's representations")
        if source == "denoiser":
            layer = check_blocks(blocks, layer, layer_tokens, layer_selection, replicate_time)
        grid = build_time_grid(times, granularities)
        served = grid if probe_times is None else [grid[i] for i in select_times(grid, probe_times)]
        of = checkpoint_source(checkpoint, source, ema, images, grid, dtype, ("train", "test"), blocks, draws,
                               noise_seed)
        check_image_shape(checkpoint, of.image_shape, images)
        tokens = served * len(blocks) if layer_tokens else served
        super().__init__(tokens, images.num_classes, images.task_names, 0, seeds, batch_size, eval_batch_size,
                         standardize, replicate_time)
        self.served_times = served
        # `times` (explicit grid points) is left out: a logger merges these hparams with the ProbeModule's, whose
        # `times` are the served times, and refuses keys with different values.
        self.save_hyperparameters(ignore=["images", "times"])
        self.images, self.grid = images, grid
        self.layer = None if layer_tokens else layer
        self.cache_path = Path(cache_dir) / cache_key(of.identity)
        served_layers = {} if source == "encoder" else {"layer_tokens": blocks} if layer_tokens else {
            "layer": layer, **({"layer_selection": layer_selection} if layer_selection else {})}
        self.metadata.update({
            "dataset": dataset_name or type(images).__name__,
            **of.described,
            **served_layers,
            "checkpoint": str(checkpoint),
            "cache_key": self.cache_path.name,
            "weights": "ema" if ema else "raw",
        })
        self.cache_ready = False
        if self.cache_path.exists() and not recompute:
            self.read_manifest()

    def read_manifest(self) -> None:
        """Take the feature width and the noise process (the VE SDE the continuous head reads; a DDPM backbone has
        none) from the cache's manifest: the cache is ready to serve."""
        cache = RepresentationCache(self.cache_path)
        sde = cache.manifest.get("sde") or cache.manifest.get("backbone", {}).get("sde")
        if sde is not None:
            self.metadata["sde"] = sde
        if self.hparams.source == "encoder":
            self.feature_dim = cache.feature_dim
        else:
            widths = [cache.feature_dim[cache.layer_index(block)] for block in self.hparams.blocks]
            self.feature_dim = max(widths) if self.hparams.layer_tokens else widths[
                self.hparams.blocks.index(self.layer)]
        self.cache_ready = True
        self.metadata["latent_dim"] = self.feature_dim

    @property
    def feature_dim(self) -> int:
        """The width of what is served, read from the cache (a clear error while there is none)."""
        self.require_cache()
        return self._feature_dim

    @feature_dim.setter
    def feature_dim(self, width: int) -> None:
        self._feature_dim = width

    def require_cache(self) -> None:
        """A clear error while the cache is missing (the CLI builds it before anything reads the data)."""
        if not self.cache_ready:
            raise TrajrepError(f"the representation cache {self.cache_path} is not built yet: `trajrep fit` and the "
                               "presets build it first; in Python, call trajrep.extract.build_cache(data)")

    @property
    def probe_spec(self) -> dict:
        self.require_cache()
        return super().probe_spec

    def load_stages(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        self.require_cache()
        cache = RepresentationCache(self.cache_path)
        indices = select_times(cache.times, self.served_times)

        def representations(split: str) -> torch.Tensor:
            if not self.hparams.layer_tokens:
                return torch.from_numpy(cache.representations(split, indices, self.layer)).float()
            blocks = [torch.from_numpy(cache.representations(split, indices, block)).float()
                      for block in self.hparams.blocks]
            return torch.cat([nn.functional.pad(x, (0, self.feature_dim - x.shape[-1])) for x in blocks], dim=1)

        train = (representations("train"), torch.from_numpy(cache.labels("train")))
        test = (representations("test"), torch.from_numpy(cache.labels("test")))
        if not self.hparams.layer_tokens:  # reported beside the accuracies: does the representation change along t?
            self.metadata["linear_cka"] = linear_cka(test[0]).tolist()
        return split_stages(train, test, self.hparams.val_fraction, self.hparams.split_seed)


class PixelProbeData(ProbeData):
    """The raw-pixel control: each image's normalised pixels as one representation (N, 1, C*H*W), split into
    train/val exactly as RepresentationDataModule splits the same images (`dataset_name` as there). Probe it with
    the single-t heads (mlp, linear) or kNN.

    Args:
        images: the image datamodule whose pixels are probed.
        val_fraction: share of the official training split held out for selection.
        split_seed: the draw of the validation split.
        seeds: the probe seeds.
        batch_size: training batch of the probes.
        eval_batch_size: batch of validation and test passes.
        standardize: scale every pixel to mean 0, std 1 (train statistics).
        dataset_name: the data's name in tables and figures.
    """

    def __init__(self, images: ImageDataModule, val_fraction: float = 0.1, split_seed: int = 0,
                 seeds: list[int] = [0, 1, 2, 3, 4], batch_size: int = 256, eval_batch_size: int = 1024,
                 standardize: bool = True, dataset_name: str | None = None) -> None:
        check_val_fraction(val_fraction)
        channels, height, width = images.image_shape
        super().__init__([0.0], images.num_classes, images.task_names, channels * height * width, seeds, batch_size,
                         eval_batch_size, standardize)
        self.save_hyperparameters(ignore=["images"])
        self.images = images
        identity = images.identity()
        self.metadata.update({"dataset": dataset_name or type(images).__name__, "encoder_mode": "pixels",
                              "latent_dim": self.feature_dim, "pretrain_seed": None, "pretrain_steps": None,
                              "cache_key": "pixels-" + cache_key(identity)})

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.images.stacked(split)
        return self.images.normalize(images).flatten(1).unsqueeze(1), labels

    def load_stages(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return split_stages(self._split("train"), self._split("test"), self.hparams.val_fraction,
                            self.hparams.split_seed)


def check_image_shape(checkpoint: str, trained_on: tuple[int, int, int], images: ImageDataModule) -> None:
    """The images must be those the model was built for."""
    if tuple(trained_on) != tuple(images.image_shape):
        raise TrajrepError(f"{checkpoint} was pretrained on {trained_on[0]}-channel {trained_on[1]} px images "
                           f"but {type(images).__name__} serves {images.image_shape[0]}-channel "
                           f"{images.image_shape[1]} px ones; set data.images to the pretraining dataset")


def check_blocks(blocks: list[str] | None, layer: str | None, layer_tokens: bool, layer_selection: str | None,
                 replicate_time: float | None) -> str:
    """The served layer of a denoiser source (the first block by default), its options checked."""
    if not blocks:
        raise TrajrepError("source: denoiser needs blocks, the names of the backbone's blocks to cache; "
                           "`trajrep extract --list_layers true` lists them")
    if layer_tokens and (layer is not None or layer_selection or replicate_time is not None):
        raise TrajrepError("layer_tokens serves every block at every t: leave out layer, layer_selection "
                           "and replicate_time")
    layer = blocks[0] if layer is None else layer
    if layer not in blocks:
        raise TrajrepError(f"layer {layer!r} is not among the cached blocks {blocks}; add it to blocks")
    return layer


def check_val_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise TrajrepError(f"val_fraction must be in (0, 1), got {val_fraction}")


def standardize_stages(stages: dict[str, tuple[torch.Tensor, torch.Tensor]]
                       ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every stage rescaled per (t, dimension) by the train stage's mean and std; a dimension that is constant
    on train is only centred."""
    names = ["train", *(name for name in stages if name != "train")]
    scaled = standardise(*(stages[name][0] for name in names))
    return {name: (x, stages[name][1]) for name, x in zip(names, scaled)}


def standardise(train: torch.Tensor, *others: torch.Tensor, dim: int = 0) -> list[torch.Tensor]:
    """`train` and `others` standardised per feature with the mean and std of `train` along `dim` (examples):
    held-out data must not inform the probe. A feature that is constant on train is only centred."""
    std, mean = torch.std_mean(train, dim=dim, keepdim=True)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return [(x - mean) / std for x in (train, *others)]


def split_stages(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                 val_fraction: float, split_seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{train, val, test}: a fixed random `val_fraction` of the official training split becomes validation."""
    order = torch.randperm(len(train[0]), generator=torch.Generator().manual_seed(split_seed))
    num_val = round(val_fraction * len(train[0]))
    if num_val >= len(train[0]) or num_val < 1:
        raise TrajrepError(f"val_fraction {val_fraction} of the {len(train[0])} training images leaves "
                           f"{len(train[0]) - num_val} to train on and {num_val} to validate on; both need at "
                           "least one: choose a val_fraction nearer 0.1, or use more images")
    val_rows, train_rows = order[:num_val], order[num_val:]
    return {"train": (train[0][train_rows], train[1][train_rows]), "val": (train[0][val_rows], train[1][val_rows]),
            "test": test}
