"""Extraction: E(x0, t) for every image and every grid time, written into a representation cache.

Runs Lightning's predict loop, so progress bars, devices and DDP come from the Trainer. All times of a batch go
through the encoder in one pass. Under DDP each rank takes whole batches of the single-process order, so every
batch has the same content on any number of processes and the cache is the same bit for bit.
"""

import inspect
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from trajrep.checkpoint import pretrained_state, read_checkpoint
from trajrep.data.base import SPLITS, ImageDataModule
from trajrep.data.cache import CacheWriter, RepresentationCache, cache_key, cache_lock
from trajrep.data.identity import encoder_identity
from trajrep.data.representations import RepresentationDataModule
from trajrep.errors import TrajrepError
from trajrep.pretrain.module import PretrainModule


class IndexedDataset(Dataset):
    """Yields (row index, image, label), so writers know where each result belongs."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        image, label = self.dataset[index]
        return index, image, label


class WholeBatchSampler(DistributedSampler):
    """Rank r takes batches b = r, r + W, ... of the sequential order, each batch whole.

    Unlike DistributedSampler's interleaving this never pads or duplicates, and a batch holds the same images
    whatever the number of processes, which keeps the numerics identical to a single-process run.
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        starts = range(rank * batch_size, len(dataset), num_replicas * batch_size)
        self.indices = [i for start in starts for i in range(start, min(start + batch_size, len(dataset)))]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ExtractionData(pl.LightningDataModule):
    """Predict-time view of an image datamodule: the requested splits, indexed, normalised on transfer (by the
    datamodule, as in pretraining, unless `normalize` scales uint8 images to another model's input range)."""

    def __init__(self, images: ImageDataModule, splits: tuple[str, ...], batch_size: int,
                 normalize: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__()
        self.images = images
        self.splits = splits
        self.batch_size = batch_size
        self.normalize = normalize or images.normalize

    def predict_dataloader(self) -> list[DataLoader]:
        loaders = []
        for split in self.splits:
            dataset = IndexedDataset(self.images.dataset(split))
            sampler = WholeBatchSampler(dataset, self.batch_size, self.trainer.world_size, self.trainer.global_rank)
            loaders.append(DataLoader(dataset, batch_size=self.batch_size, sampler=sampler,
                                      num_workers=self.images.hparams.get("num_workers", 0)))
        return loaders

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        index, images, labels = batch
        return index, self.normalize(images), labels


def full_precision(device: torch.device) -> torch.autocast:
    """Autocast off while a cache is extracted: it holds full-precision features under any mixed precision the
    Trainer runs, the content its key stands for (the key names no precision)."""
    return torch.autocast(device.type, enabled=False)


# Encoder inputs per pass: on a CPU the fastest in benchmarks/extract.py (activations stay in cache); a GPU wants
# large passes to stay busy.
CPU_PASS_SIZE, GPU_PASS_SIZE = 64, 1000


def pass_size_for(device: torch.device) -> int:
    """The default encoder inputs per pass on `device`."""
    return GPU_PASS_SIZE if device.type == "cuda" else CPU_PASS_SIZE


class Extractor(pl.LightningModule):
    """Predict-loop module holding only the encoder: (index, x0, y) -> (index, E(x0, t) for all t, y).

    Every (image, t) pair of a batch goes through the encoder in passes of at most `pass_size` inputs: large
    enough to keep the device busy, small enough that a CPU's activations stay in cache (benchmarks/extract.py);
    None takes the default of the device the batch is on.
    """

    def __init__(self, pretrained: PretrainModule, times: list[float], pass_size: int | None = None) -> None:
        super().__init__()
        if pass_size is not None and pass_size < 1:
            raise TrajrepError(f"pass_size must be >= 1 encoder inputs (or unset for the device's default), got "
                               f"{pass_size}")
        self.encoder, self.pass_size = pretrained.require_encoder("extraction"), pass_size
        self.register_buffer("log_sigmas", pretrained.sde.log_sigma(torch.tensor(times, dtype=torch.float32)))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        """(B, T, d): every image at every time."""
        batch, num_times = x0.shape[0], self.log_sigmas.numel()
        inputs = x0.unsqueeze(1).expand(batch, num_times, *x0.shape[1:]).reshape(batch * num_times, *x0.shape[1:])
        log_sigmas = self.log_sigmas.repeat(batch)
        size = pass_size_for(x0.device) if self.pass_size is None else self.pass_size
        reps = torch.cat([self.encoder.representation(part, level) for part, level
                          in zip(inputs.split(size), log_sigmas.split(size))])
        return reps.view(batch, num_times, -1)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        index, x0, labels = batch
        with full_precision(x0.device):
            return index, self(x0), labels


class CacheRowWriter(BasePredictionWriter):
    """Writes each predicted batch into the cache arrays; rank 0 allocates before and finalises after."""

    def __init__(self, writer: CacheWriter, splits: tuple[str, ...]) -> None:
        super().__init__(write_interval="batch")
        self.writer = writer
        self.splits = splits

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.writer.allocate()
        trainer.strategy.barrier("cache-allocated")
        self.writer.open()

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        index, reps, labels = prediction  # reps: (B, T, d), or one such tensor per layer
        arrays = [part.float().cpu().numpy().astype(self.writer.dtype) for part in
                  (reps if isinstance(reps, list) else [reps])]
        self.writer.write(self.splits[dataloader_idx], index.cpu().numpy(),
                          arrays if isinstance(reps, list) else arrays[0], labels.cpu().numpy())

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.strategy.barrier("cache-written")
        if trainer.is_global_zero:
            self.writer.finalize()
        trainer.strategy.barrier("cache-finalized")


def load_pretrained_weights(model: PretrainModule, ckpt_path: str | Path, ema: bool,
                            checkpoint: dict | None = None) -> None:
    """Load raw (the paper's choice) or EMA weights of a training checkpoint into `model`."""
    checkpoint = read_checkpoint(ckpt_path) if checkpoint is None else checkpoint
    state = pretrained_state(checkpoint, ema, ckpt_path)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        lines = str(error).splitlines()
        detail = lines[1].strip() if len(lines) > 1 else lines[0]
        raise TrajrepError(f"checkpoint {ckpt_path} does not match the model in the config ({detail}); use the "
                           "config the checkpoint was trained with") from None


def load_pretrained_model(ckpt_path: str | Path, ema: bool) -> PretrainModule:
    """Rebuild the PretrainModule a checkpoint was trained as, from its saved hyperparameters, and load it.

    The returned model's `pretrain_seed` is the seed its training run used (None when unknown) and
    `pretrain_steps` its optimizer steps (0 for an untrained control), `batchnorm_calibration` how an untrained
    control's BatchNorm statistics were set (None for trained encoders).
    """
    checkpoint = read_checkpoint(ckpt_path)
    accepted = inspect.signature(PretrainModule).parameters
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if k in accepted}
    model = PretrainModule(**hparams)
    load_pretrained_weights(model, ckpt_path, ema, checkpoint)
    model.pretrain_seed = checkpoint.get("pretrain_seed")
    model.pretrain_steps = checkpoint.get("global_step")
    model.batchnorm_calibration = checkpoint.get("batchnorm_calibration")
    return model.eval()


def extract_representations(trainer: pl.Trainer, model: PretrainModule, images: ImageDataModule,
                            times: list[float], ema: bool, dtype: str, cache_dir: str | Path,
                            splits: tuple[str, ...] = SPLITS, batch_size: int = 64, recompute: bool = False,
                            checkpoint: str | None = None, pass_size: int | None = None) -> Path:
    """Build (or reuse) the cache for `model`'s encoder, already loaded with the weights to extract."""
    encoder, sde = model.require_encoder("extraction"), model.sde
    identity = encoder_identity(encoder.state_dict(), model.hparams.mode, (sde.sigma_min, sde.sigma_max), ema, times,
                                dtype, splits, images.identity())
    sigmas = [math.exp(v) for v in model.sde.log_sigma(torch.tensor(times)).tolist()]
    return write_cache(trainer, Extractor(model, times, pass_size), identity, {"checkpoint": checkpoint,
                       "sigmas": sigmas}, ExtractionData(images, splits, batch_size), times, model.latent_dim,
                       dtype, cache_dir, recompute)


def write_cache(trainer: pl.Trainer, predictor: pl.LightningModule, identity: dict, described: dict,
                data: ExtractionData, times: list[float], feature_dim: int | list[int], dtype: str,
                cache_dir: str | Path, recompute: bool, layers: list[str] | None = None) -> Path:
    """The cache of `identity` (its key), reused when it exists, else written by Lightning's predict loop over
    `data` with `predictor`, whose predictions are (row index, features, labels); `described` goes into the
    manifest beside the identity (what the cache is of, but not part of its key)."""
    for split in data.splits:
        if split not in SPLITS:
            raise TrajrepError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    if trainer.precision.endswith("-true") and trainer.precision != "32-true":
        raise TrajrepError(f"a cache holds full-precision features (its key names no precision), and this trainer "
                           f"keeps the weights in {trainer.precision}: pass --trainer.precision=32-true (a mixed "
                           "precision is fine: extraction runs with autocast off)")
    key = cache_key(identity)
    cache_dir = Path(cache_dir)
    path = cache_dir / key
    # Only rank 0 locks: under DDP the other ranks exist only once rank 0, holding the lock, has started predict.
    with cache_lock(cache_dir, key) if trainer.global_rank == 0 else nullcontext():
        if path.exists() and not recompute:
            RepresentationCache(path)
            rank_zero_info(f"Reusing representation cache {path}")
            return path
        images = data.images
        sizes = {split: len(images.dataset(split)) for split in data.splits}
        label_shapes = {split: tuple(images.dataset(split)[0][1].shape) for split in data.splits}
        writer = CacheWriter(path, {**identity, "key": key, **described}, sizes, label_shapes, times, feature_dim,
                             dtype, layers)
        row_writer = CacheRowWriter(writer, data.splits)
        trainer.callbacks.append(row_writer)
        start = time.perf_counter()
        try:
            trainer.predict(predictor, datamodule=data, return_predictions=False)
        finally:
            trainer.callbacks.remove(row_writer)
        seconds = time.perf_counter() - start
        rank_zero_info(f"Extracted {sum(sizes.values())} images x {len(times)} times in {seconds:.1f} s "
                       f"({sum(sizes.values()) * len(times) / seconds:.0f} images x t / s) -> {path}")
        return path


def build_cache(data: RepresentationDataModule, trainer: pl.Trainer | None = None) -> Path:
    """Extract the cache that `data` reads from the checkpoint it names, with `trainer` (its devices and strategy;
    by default one device, no logger); `data` then serves it. The global RNG is left as it was: building the model
    draws from it, and the probe that reads the cache next draws its dropout from it (seeded by seed_everything),
    so a probe trains alike whether its cache was there or not."""
    trainer = trainer or pl.Trainer(devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False)
    options = data.hparams
    kwargs = {"dtype": options.dtype, "cache_dir": options.cache_dir, "batch_size": options.extract_batch_size,
              "recompute": options.recompute, "checkpoint": options.checkpoint}
    with torch.random.fork_rng(devices=[]):
        if options.source == "encoder":
            model = load_pretrained_model(options.checkpoint, options.ema)
            path = extract_representations(trainer, model, data.images, data.grid, options.ema, **kwargs)
        else:
            from trajrep.denoiser import extract_denoiser_features, load_backbone  # denoiser.py builds on this

            backbone = load_backbone(options.checkpoint, options.ema, data.images)
            path = extract_denoiser_features(trainer, backbone, data.images, data.grid, options.blocks,
                                             draws=options.draws, noise_seed=options.noise_seed, **kwargs)
    if path != data.cache_path:
        raise TrajrepError(f"the extracted cache {path.name} is not the {data.cache_path.name} that the data asked "
                           "for: the checkpoint changed while it was read; run the command again")
    data.read_manifest()
    return path
