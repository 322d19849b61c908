"""OnlineProbe: while pretraining runs, how well a linear probe reads E(x0, t) at a few t, logged every N steps.

A day-long run shows early whether the encoder learns (held-out accuracy per t), whether t matters (linear CKA
between the first and last t) and whether the features still tell images apart (the between-image fraction of
their variance; a broken encoder gives nearly constant features, a fraction near 0).
"""

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.data import default_collate

from trajrep.data.base import ImageDataModule
from trajrep.data.representations import standardise
from trajrep.errors import TrajrepError
from trajrep.extract import Extractor, pass_size_for
from trajrep.pretrain.module import PretrainModule
from trajrep.similarity import linear_cka

DEFAULT_TIMES = (0.0, 0.25, 0.5, 0.75, 1.0)


def ridge_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                         num_classes: int, ridge: float = 1e-3) -> torch.Tensor:
    """Held-out accuracy of closed-form ridge regression onto one-hot labels, per leading index of the features.

    `train_x` (..., N, d) and `test_x` (..., M, d) are standardised with the train statistics; the intercept is the
    class frequency and `ridge` is relative to the (unit) feature variance. Solved in float64: cheap (a d x d
    system per leading index) and deterministic, so two runs of the same weights log the same number.
    """
    train_x, test_x = standardise(train_x.double(), test_x.double(), dim=-2)
    targets = F.one_hot(train_y, num_classes).double()
    prior = targets.mean(dim=0)
    n, d = train_x.shape[-2:]
    gram = train_x.mT @ train_x / n + ridge * torch.eye(d, dtype=torch.float64, device=train_x.device)
    weights = torch.linalg.solve(gram, train_x.mT @ (targets - prior) / n)
    predicted = (test_x @ weights + prior).argmax(dim=-1)
    return (predicted == test_y).double().mean(dim=-1)


def between_image_fraction(features: torch.Tensor) -> torch.Tensor:
    """Share of the features' second moment that varies between images, per leading index of (..., N, d):
    sum_j Var_n f_nj / sum_j E_n f_nj^2. 1 for centred features, 0 for features that are the same for every image."""
    features = features.double()
    variance = features.var(dim=-2, unbiased=False).sum(dim=-1)
    second_moment = features.pow(2).mean(dim=-2).sum(dim=-1)
    return variance / second_moment.clamp_min(1e-300)


def time_name(t: float) -> str:
    """t as it appears in metric names: t0, t0.25, t1."""
    return f"t{t:g}"


def accuracy_name(task: str, t: float) -> str:
    """The logged name of a task's held-out accuracy at t: online/acc_class_t0.5."""
    return f"online/acc_{task}_{time_name(t)}"


def split_accuracy_name(name: str) -> tuple[str, str]:
    """(task, time name) of an accuracy metric's name; task names may hold underscores, time names do not."""
    task, time = name.removeprefix("online/acc_").rsplit("_", 1)
    return task, time


def probe_metrics(features: torch.Tensor, labels: torch.Tensor, num_train: int, times: tuple[float, ...],
                  tasks: dict[str, int], ridge: float) -> dict[str, float]:
    """The logged numbers from features (N, T, d) of the probe subset and its labels (N, tasks), whose first
    `num_train` rows train the probes and the rest are held out; `tasks` maps each label column's name to its
    number of classes."""
    per_time = features.transpose(0, 1)  # (T, N, d)
    metrics = {}
    for column, (task, num_classes) in enumerate(tasks.items()):
        accuracy = ridge_probe_accuracy(per_time[:, :num_train], labels[:num_train, column], per_time[:, num_train:],
                                        labels[num_train:, column], num_classes, ridge)
        metrics |= {accuracy_name(task, t): float(a) for t, a in zip(times, accuracy)}
    fraction = between_image_fraction(per_time)
    cka = linear_cka(features[:, [0, -1]], max_examples=len(features))[0, 1]
    return {
        **metrics,
        f"online/cka_{time_name(times[0])}_{time_name(times[-1])}": float(cka),
        "online/between_image_fraction": float(fraction.mean()),
        **{f"online/between_image_fraction_{time_name(t)}": float(f) for t, f in zip(times, fraction)},
    }


def subset_sizes(available: int, num_train: int, num_heldout: int) -> tuple[int, int]:
    """(train, held-out) sizes, shrunk in proportion when the training split has fewer images than asked for."""
    if available >= num_train + num_heldout:
        return num_train, num_heldout
    if available < 2:
        raise TrajrepError(f"OnlineProbe needs at least 2 training images, the training split has {available}")
    heldout = min(max(1, round(available * num_heldout / (num_train + num_heldout))), available - 1)
    return available - heldout, heldout


@contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm reads, and does not update, its running statistics), then the previous mode again."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class OnlineProbe(pl.Callback):
    """Every `every_n_steps` optimizer steps, and at the last step (`at_end`, when the run stops at max_steps),
    fits a linear probe per t on a fixed labelled subset of the training split and logs to the Trainer's loggers:

    - `online/acc_{task}_t{t}`: held-out accuracy of a closed-form ridge probe on standardised E(x, t), per task
      (`online/acc_class_t0.5` on single-task data) and t;
    - `online/cka_t{first}_t{last}`: linear CKA between E(x, first t) and E(x, last t);
    - `online/between_image_fraction` (mean over t) and `online/between_image_fraction_t{t}`;
    - `online/seconds`: what the probe cost, also printed with the numbers on one line.

    The subset is `num_train` + `num_heldout` images of a permutation of the training split drawn from `seed` (the
    same images in every run and after a resume), shrunk in proportion for smaller splits; every task of
    multi-task data is probed on the same features (one ridge solve each), so a run shows which t each task reads
    best. The encoder is the live (raw) one, in eval mode, as `trajrep extract` reads it by default (not the EMA
    weights, which the EMA callback swaps in for validation only), under the Trainer's precision (as its steps
    and extraction run), with features in float32 and the ridge in float64. It draws nothing from the training
    RNG stream, so resumed runs stay exact. Under DDP only rank 0 probes and logs, with no collective call inside
    (nothing can hang; the other ranks wait for it at the next gradient all-reduce). `every_n_steps: 0` turns the
    periodic probe off; `probe(trainer, module)` runs it on demand.

    Args:
        every_n_steps: optimizer steps between probes; 0 probes only at the end.
        times: the t probed.
        num_train: labelled training images of the ridge probe.
        num_heldout: images it is evaluated on.
        tasks: the label columns probed (multi-task data); None: every task.
        ridge: the ridge penalty, relative to the (unit) variance of the standardised features.
        seed: the draw of the probe's images.
        pass_size: images x times per encoder pass; None: 1000 on a GPU, 64 on a CPU.
        at_end: also probe at the last step.
    """

    def __init__(self, every_n_steps: int = 500, times: tuple[float, ...] = DEFAULT_TIMES, num_train: int = 5000,
                 num_heldout: int = 1000, tasks: list[int] | None = None, ridge: float = 1e-3, seed: int = 0,
                 pass_size: int | None = None, at_end: bool = True) -> None:
        if every_n_steps < 0:
            raise TrajrepError(f"OnlineProbe every_n_steps must be >= 0 (0: only at the end), got {every_n_steps}")
        if not times or any(not 0 <= t <= 1 for t in times):
            raise TrajrepError(f"OnlineProbe times must be a non-empty list of t in [0, 1], got {list(times)}")
        if num_train < 1 or num_heldout < 1:
            raise TrajrepError(f"OnlineProbe needs num_train >= 1 and num_heldout >= 1, got {num_train} and "
                               f"{num_heldout}")
        if tasks is not None and (not tasks or len(set(tasks)) != len(tasks)):
            raise TrajrepError(f"OnlineProbe tasks must be distinct label columns (or null for every task), "
                               f"got {tasks}")
        if ridge <= 0 or (pass_size is not None and pass_size < 1):
            raise TrajrepError(f"OnlineProbe needs ridge > 0 and pass_size >= 1, got {ridge} and {pass_size}")
        self.every_n_steps, self.times, self.at_end = every_n_steps, tuple(float(t) for t in times), at_end
        self.num_train, self.num_heldout, self.tasks = num_train, num_heldout, tasks
        self.ridge, self.seed, self.pass_size = ridge, seed, pass_size
        self.encoder_pass_size = pass_size  # resolved for the device in _prepare
        self._images = self._labels = self._extractor = self._split = self._tasks = None
        self._last_step: int | None = None

    def _take_subset(self, datamodule: ImageDataModule, device: torch.device) -> None:
        """The probe's uint8 images and labels (N, tasks probed) on `device`, train part first; only these
        images are read."""
        columns = range(len(datamodule.num_classes)) if self.tasks is None else self.tasks
        if any(not 0 <= task < len(datamodule.num_classes) for task in columns):
            raise TrajrepError(f"OnlineProbe tasks {self.tasks} do not exist: {type(datamodule).__name__} has "
                               f"{len(datamodule.num_classes)} task(s) {datamodule.task_names}")
        self._tasks = {datamodule.task_names[task]: datamodule.num_classes[task] for task in columns}
        dataset = datamodule.dataset("train")
        self._split = subset_sizes(len(dataset), self.num_train, self.num_heldout)
        if self._split != (self.num_train, self.num_heldout):
            rank_zero_info(f"OnlineProbe: the training split has {len(dataset)} images, so the probe uses "
                           f"{self._split[0]} to train and {self._split[1]} held out")
        generator = torch.Generator().manual_seed(self.seed)
        indices = torch.randperm(len(dataset), generator=generator)[:sum(self._split)]
        with torch.random.fork_rng(devices=[]):  # a dataset could draw when indexed
            images, labels = default_collate([dataset[i] for i in indices.tolist()])
        labels = labels.reshape(len(labels), -1)[:, list(columns)]
        self._images, self._labels = images.to(device), labels.long().to(device)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if not isinstance(pl_module, PretrainModule) or not isinstance(trainer.datamodule, ImageDataModule):
            raise TrajrepError("OnlineProbe needs a pretraining run: a PretrainModule and an image datamodule")
        if pl_module.encoder is None:  # a config shared by every mode of a preset need not drop the callback
            rank_zero_warn("OnlineProbe reads E(x0, t), and this model is score-only (it has no encoder): the "
                           "callback stays idle; probe its denoiser features with `trajrep extract --source "
                           "denoiser` after training")
            return
        self._prepare(pl_module, trainer.datamodule)

    def _prepare(self, pl_module: PretrainModule, datamodule: ImageDataModule) -> None:
        self._take_subset(datamodule, pl_module.device)
        self.encoder_pass_size = pass_size_for(pl_module.device) if self.pass_size is None else self.pass_size
        self._extractor = Extractor(pl_module, list(self.times), self.encoder_pass_size).to(pl_module.device)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step  # a resumed run's first step was probed (or skipped) before

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        periodic = self.every_n_steps > 0 and step % self.every_n_steps == 0
        # The last step is probed here rather than in on_train_end, where EMA has already put its weights in.
        last = self.at_end and step == trainer.max_steps
        idle = pl_module.encoder is None
        if trainer.is_global_zero and (periodic or last) and step != self._last_step and not idle:
            self.probe(trainer, pl_module)

    def measure(self, pl_module: PretrainModule, datamodule: ImageDataModule,
                forward_context: AbstractContextManager = nullcontext()) -> dict[str, float]:
        """The probe's numbers for `pl_module`'s encoder as it is now, without a Trainer (for a baseline such as
        the calibrated untrained encoder); `forward_context` is the precision to encode under."""
        if self._extractor is None or self._extractor.encoder is not pl_module.encoder:
            self._prepare(pl_module, datamodule)
        start = time.perf_counter()
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), evaluating(pl_module.encoder), torch.no_grad(), forward_context:
            features = torch.cat([self._extractor(datamodule.normalize(chunk)).float()
                                  for chunk in self._images.split(self.encoder_pass_size)])
        metrics = probe_metrics(features, self._labels, self._split[0], self.times, self._tasks, self.ridge)
        metrics["online/seconds"] = time.perf_counter() - start
        return metrics

    def pixel_accuracy(self, datamodule: ImageDataModule, components: int | None = None) -> dict[str, float]:
        """Held-out accuracy per task of the same ridge probe on the subset's raw (normalised, flattened) pixels:
        the reference a representation should approach. With `components`, on the pixels' top principal
        components (fitted on the probe's training images) instead: what the linear code of that size that best
        reconstructs the pixels keeps, the reference for a latent of that size."""
        if self._images is None:
            self._take_subset(datamodule, torch.device("cpu"))
        pixels = datamodule.normalize(self._images).flatten(1).double()
        train, labels = self._split[0], self._labels
        if components is not None:
            centred = pixels - pixels[:train].mean(dim=0)
            directions = torch.linalg.svd(centred[:train], full_matrices=False).Vh[:components]
            pixels = centred @ directions.T
        return {task: float(ridge_probe_accuracy(pixels[:train], labels[:train, column], pixels[train:],
                                                 labels[train:, column], num_classes, self.ridge))
                for column, (task, num_classes) in enumerate(self._tasks.items())}

    def probe(self, trainer: pl.Trainer, pl_module: PretrainModule) -> dict[str, float]:
        """Run the probe on the current encoder now, log its numbers at the current step and return them."""
        metrics = self.measure(pl_module, trainer.datamodule, trainer.precision_plugin.forward_context())
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self._last_step = trainer.global_step
        rank_zero_info(self._summary(trainer.global_step, metrics))
        return metrics

    def _summary(self, step: int, metrics: dict[str, float]) -> str:
        accuracy = "; ".join(
            (f"{task} " if len(self._tasks) > 1 else "")
            + ", ".join(f"t={t:g} {100 * metrics[accuracy_name(task, t)]:.1f} %" for t in self.times)
            for task in self._tasks)
        cka_key = f"online/cka_{time_name(self.times[0])}_{time_name(self.times[-1])}"
        return (f"online probe at step {step}: held-out accuracy {accuracy}; CKA(t={self.times[0]:g}, "
                f"t={self.times[-1]:g}) {metrics[cka_key]:.3f}; between-image fraction "
                f"{metrics['online/between_image_fraction']:.3g}; {metrics['online/seconds']:.1f} s")
