"""ProgressLog: a progress line every minute or so, and a summary at the end, when progress bars are off.

Presets and batch jobs turn bars off (they flood log files); without this a 30-minute pretraining would print
nothing between its start and its end. The trajrep CLI adds it to every Trainer whose progress bar is disabled;
loops outside Lightning (MINE) print through the same Ticker.
"""

import time
from collections.abc import Callable

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info


def duration(seconds: float) -> str:
    """12 s, 4.5 min, 2.1 h."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def with_progress(trainer: pl.Trainer) -> pl.Trainer:
    """The Trainer, with a ProgressLog added when it shows no progress bar and has none."""
    if trainer.progress_bar_callback is None and not any(isinstance(c, ProgressLog) for c in trainer.callbacks):
        trainer.callbacks.append(ProgressLog())
    return trainer


def latest_numbers(trainer: pl.Trainer, limit: int = 3) -> str:
    """The last logged training losses and accuracies, e.g. 'train/loss 48.1'."""
    shown = [(key, value) for key, value in trainer.callback_metrics.items()
             if key.startswith("train") and ("loss" in key or "acc" in key) and value.numel() == 1]
    return ", ".join(f"{key} {float(value):.4g}" for key, value in shown[:limit])


class Ticker:
    """Prints `what done/total (percent), rate/s, ETA; numbers` when at least `every_seconds` passed since the last
    line; `total` may be unknown (inf). `numbers` is a function, called only for a printed line (it may sync a
    device)."""

    def __init__(self, what: str, total: float, first: int = 0, every_seconds: float = 60.0) -> None:
        self.what, self.total, self.first, self.every_seconds = what, total, first, every_seconds
        self.start = self.last_print = time.perf_counter()

    def tick(self, done: int, numbers: Callable[[], str] | None = None) -> None:
        now = time.perf_counter()
        if now - self.last_print < self.every_seconds:
            return
        self.last_print = now
        rate = (done - self.first) / max(now - self.start, 1e-9)
        known = self.total != float("inf")
        left = f", ETA {duration((self.total - done) / rate)}" if rate > 0 and known else ""
        of = f"/{int(self.total)} ({100 * done / self.total:.0f} %)" if known else ""
        shown = numbers() if numbers is not None else ""
        rank_zero_info(f"{self.what} {done}{of}, {rate:.3g}/s{left}" + (f"; {shown}" if shown else ""))

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


class ProgressLog(pl.Callback):
    """Every `every_seconds` (checked at batch ends), one line: what runs, how far (step or batch of how many),
    the rate, an ETA and the latest training numbers; at the end of training or prediction, one summary line."""

    def __init__(self, every_seconds: float = 60.0) -> None:
        self.every_seconds = every_seconds
        self._ticker: Ticker | None = None
        self._predicted = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ticker = Ticker(f"{type(pl_module).__name__} fit, step", trainer.estimated_stepping_batches,
                              trainer.global_step, self.every_seconds)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        self._ticker.what = f"{type(pl_module).__name__} fit, epoch {trainer.current_epoch}, step"
        self._ticker.tick(trainer.global_step, lambda: latest_numbers(trainer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds, steps = self._ticker.seconds, trainer.global_step - self._ticker.first
        numbers = latest_numbers(trainer)
        rank_zero_info(f"{type(pl_module).__name__} fit done: {steps} steps in {duration(seconds)} "
                       f"({steps / max(seconds, 1e-9):.3g} steps/s), at step {trainer.global_step}"
                       + (f"; {numbers}" if numbers else ""))

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ticker = Ticker(f"{type(pl_module).__name__} predict, batch", sum(trainer.num_predict_batches),
                              every_seconds=self.every_seconds)
        self._predicted = 0

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._predicted += 1
        self._ticker.tick(self._predicted)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank_zero_info(f"{type(pl_module).__name__} predict done: {self._predicted} batches in "
                       f"{duration(self._ticker.seconds)}")
