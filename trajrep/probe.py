"""ProbeModule: a whole probe grid (learning rates x seeds, x times for the single-t MLP, x tasks) as ONE model.

Members are independent probes with stacked weights (trajrep.nn.grouped): per-member learning rate (GroupedAdam),
per-member gradient clipping, per-seed initialisation and batch order. Each epoch every member is evaluated on the
validation and the test split; at the end the protocol of SPEC §7 selects on validation (trajrep.selection) and
the results are written as JSON records (trajrep.results).
"""

import itertools
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric

from trajrep.errors import TrajrepError
from trajrep.nn.grouped import GroupedAdam
from trajrep.nn.probes import HEADS, build_head, clip_grad_norm_per_member_, random_time_subset
from trajrep.results import write_results
from trajrep.selection import best_epochs, summarise

PAPER_LEARNING_RATES = [1e-3, 7.5e-4, 5e-4, 2.5e-4, 1e-4, 5e-5]
MIXERS = ("gru", "transformer", "continuous")


class MemberAccuracy(Metric):
    """Accuracy of every member separately, summed over batches (and processes) before dividing."""

    def __init__(self, num_members: int) -> None:
        super().__init__()
        self.add_state("correct", torch.zeros(num_members), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(()), dist_reduce_fx="sum")

    def update(self, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        """predictions, labels: (G, B)."""
        self.correct += (predictions == labels).sum(dim=1).to(self.correct.dtype)
        self.total += labels.shape[1]

    def compute(self) -> torch.Tensor:
        return self.correct / self.total


class ProbeModule(pl.LightningModule):
    """Trains one probe kind's full grid on cached representations; sizes are linked from the datamodule."""

    def __init__(
        self,
        kind: str = "mlp",
        learning_rates: list[float] = PAPER_LEARNING_RATES,
        seeds: list[int] = [0, 1, 2, 3, 4],
        weight_decay: float = 1e-5,
        grad_clip: float | None = None,
        num_classes: list[int] = [10],
        task_names: list[str] | None = None,
        feature_dim: int = 128,
        times: list[float] = [0.5],
        head_kwargs: dict[str, Any] | None = None,
        results_dir: str = "results/probes",
    ) -> None:
        super().__init__()
        if kind not in HEADS:
            raise TrajrepError(f"unknown probe head {kind!r}; valid kinds: {', '.join(sorted(HEADS))}")
        if not learning_rates or min(learning_rates) <= 0:
            raise TrajrepError(f"learning rates must be positive, got {learning_rates}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        # Mixers are clipped at 1.0 (SPEC §7) unless told otherwise; the MLP-style heads are not.
        self.grad_clip = grad_clip if grad_clip is not None else (1.0 if kind in MIXERS else None)
        self.task_names = task_names or [f"task{k}" for k in range(len(num_classes))]
        time_indices = list(range(len(times))) if kind == "mlp" else [None]
        self.members = [
            {"task": k, "time_index": i, "lr": lr, "seed": seed}
            for k, i, lr, seed in itertools.product(range(len(num_classes)), time_indices, learning_rates, seeds)
        ]
        extra = {"time_index": [m["time_index"] for m in self.members]} if kind == "mlp" else {}
        self.head = build_head(kind, num_members=len(self.members), feature_dim=feature_dim, num_times=len(times),
                               num_classes=[max(num_classes)], seeds=[m["seed"] for m in self.members],
                               **extra, **(head_kwargs or {}))
        self.register_buffer("times", torch.tensor(times, dtype=torch.float32), persistent=False)
        self.register_buffer("member_task", torch.tensor([m["task"] for m in self.members]), persistent=False)
        self.register_buffer("member_seed_row", torch.tensor([seeds.index(m["seed"]) for m in self.members]),
                             persistent=False)
        # Tasks with fewer classes than the widest one get their extra logits masked out.
        classes = torch.tensor(num_classes)[self.member_task]
        self.register_buffer("logit_mask", torch.arange(max(num_classes))[None, :] >= classes[:, None],
                             persistent=False)
        self.val_accuracy = MemberAccuracy(len(self.members))
        self.test_accuracy = MemberAccuracy(len(self.members))
        self.val_history: list[list[float]] = []
        self.test_history: list[list[float]] = []
        self._subset_generator = torch.Generator().manual_seed(seeds[0])

    def member_logits(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.head(x, t).masked_fill(self.logit_mask[:, None, :], float("-inf"))

    def member_labels(self, y: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(G, B) labels of each member's task, from per-seed labels y (S, B[, K]) and member rows (G,), or from
        labels (B[, K]) shared by all members."""
        y = y[rows] if rows is not None else y.unsqueeze(0).expand(len(self.members), *y.shape)
        if y.dim() == 3:
            y = y.gather(2, self.member_task.view(-1, 1, 1).expand(-1, y.shape[1], 1)).squeeze(2)
        return y

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        inputs = self.head.select_inputs(x, self.member_seed_row)
        labels = self.member_labels(y, self.member_seed_row)
        t = self.times
        if self.hparams.kind == "continuous":
            subset = random_time_subset(len(t), generator=self._subset_generator).to(t.device)
            inputs, t = inputs[:, :, subset], t[subset]
        logits = self.member_logits(inputs, t)
        losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape).mean(1)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(losses.sum())  # the sum keeps every member's gradient its own
        if self.grad_clip is not None:
            clip_grad_norm_per_member_(self.head, self.grad_clip)
        optimizer.step()
        self.log("train/loss", losses.mean(), prog_bar=True)
        return losses.mean()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int,
                        dataloader_idx: int = 0) -> None:
        x, y = batch
        predictions = self.member_logits(x, self.times).argmax(dim=-1)
        metric = self.val_accuracy if dataloader_idx == 0 else self.test_accuracy
        metric.update(predictions, self.member_labels(y))

    def on_validation_epoch_end(self) -> None:
        val, test = self.val_accuracy.compute(), self.test_accuracy.compute()
        self.val_accuracy.reset()
        self.test_accuracy.reset()
        if self.trainer.sanity_checking:
            return
        self.val_history.append(val.tolist())
        self.test_history.append(test.tolist())
        self.log_dict({"val/acc_best_member": val.max(), "val/acc_mean": val.mean()}, prog_bar=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["probe_history"] = {"val": self.val_history, "test": self.test_history}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.val_history = checkpoint["probe_history"]["val"]
        self.test_history = checkpoint["probe_history"]["test"]

    def member_records(self) -> list[dict]:
        """One record per member: its configuration, best validation epoch, and accuracies at that epoch."""
        if not self.val_history:
            raise TrajrepError("the probe grid has no validation results; train for at least one epoch with "
                               "validation enabled (limit_val_batches > 0)")
        epochs, val, test = best_epochs(np.array(self.val_history), np.array(self.test_history))
        return [{
            "probe": self.hparams.kind,
            "task": self.task_names[m["task"]],
            "time": None if m["time_index"] is None else self.hparams.times[m["time_index"]],
            "lr": m["lr"],
            "seed": m["seed"],
            "best_epoch": int(epochs[g]),
            "val_acc": float(val[g]),
            "test_acc": float(test[g]),
        } for g, m in enumerate(self.members)]

    def on_fit_end(self) -> None:
        if not self.trainer.is_global_zero:
            return
        records = self.member_records()
        datamodule = self.trainer.datamodule
        context = {
            **getattr(datamodule, "metadata", {}),
            "probe": self.hparams.kind,
            "times": self.hparams.times,
            "epochs": len(self.val_history),
            "config": {"model": dict(self.hparams), "data": dict(getattr(datamodule, "hparams", {}))},
        }
        path = write_results(self.hparams.results_dir, records, summarise(records), context)
        self.print(f"Probe results ({len(records)} members) -> {path}")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        learning_rates = [m["lr"] for m in self.members]
        return GroupedAdam(self.head.parameters(), lr=learning_rates, weight_decay=self.hparams.weight_decay)
