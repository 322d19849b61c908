"""ProbeModule: a whole probe grid (learning rates x seeds, x times for the single-t MLP, x tasks) as ONE model.

Members are independent probes with stacked weights (trajrep.nn.grouped): per-member learning rate (GroupedAdam),
per-member gradient clipping, per-seed initialisation and batch order. Each epoch every member is evaluated on the
validation and the test split; at the end the protocol of method §7 selects on validation
(trajrep.probe.selection), and trajrep.probe.evaluation writes the results as JSON records (trajrep.probe.records).
"""

import copy
import dataclasses
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import Metric

from trajrep.diffusion import VESDE
from trajrep.errors import TrajrepError
from trajrep.nn.grouped import GroupedAdam
from trajrep.nn.probes import HeadOptions, MLPOptions, clip_grad_norm_per_member_, member_losses, random_time_subset
from trajrep.probe.kinds import build_head, kind_of, kind_of_options, options_from_config
from trajrep.probe.evaluation import ProbeResults
from trajrep.probe.selection import best_epochs

PAPER_LEARNING_RATES = [1e-3, 7.5e-4, 5e-4, 2.5e-4, 1e-4, 5e-5]


def default_member_chunk(kind: str, num_members: int) -> int:
    """Members per chunk when none is set: the whole grid where CUDA is available (one large kernel is best on a
    GPU), else the kind's CPU size (trajrep.probe.kinds)."""
    cpu_chunk = kind_of(kind).cpu_chunk
    return num_members if torch.cuda.is_available() or cpu_chunk is None else cpu_chunk


# Rows per evaluation forward on a CPU. A chunk's activations for a whole evaluation batch (16 MLPs x 1,024 x 512
# floats: 32 MiB) pass glibc's mmap threshold, so every such allocation comes from fresh pages and faults them in;
# 256 rows keep them on the heap, which made the MLP grid's evaluation 2.5x faster (`benchmarks/RESULTS.md`).
CPU_EVAL_ROWS = 256

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


def require_each_t_once(kind: str, datamodule: pl.LightningDataModule) -> None:
    """A single-t probe selects per t: (layer, t) tokens, which repeat every t once per block, would pool blocks."""
    if getattr(datamodule, "metadata", {}).get("layer_tokens"):
        raise TrajrepError(f"the {kind} probe selects one t, and layer_tokens serves every t once per block; probe "
                           "one block (--data.layer) or read the tokens with the transformer")


class ProbeModule(pl.LightningModule):
    """Trains one probe kind's full grid on cached representations; sizes are linked from the datamodule.

    The members are split into chunks of `member_chunk`, one grouped head each; a training step runs each chunk's
    forward and backward back to back, so that its activations are still in the CPU's cache for the backward
    pass (each kind's `cpu_chunk` in trajrep.probe.kinds sizes them). Where CUDA is available the default is one chunk:
    one large kernel is best on a GPU. With `export_attention`, the attention heads' records also carry each
    member's mean CLS attention over the time tokens on the test split (overall and per class) and its masking
    ablation (extra test passes at the end), both with the member's weights at its best validation epoch, the
    epoch its accuracy comes from.
    `encoder_name` names the pretraining variant in the results (a preset's encoder name), so that two variants of
    one mode and width stay apart in tables.

    Args:
        head: the head's options (trajrep.nn.probes), which say its kind (trajrep.probe.kinds): MLPOptions or
            LinearOptions (one per t); GRUOptions, TransformerOptions or ContinuousOptions (a transformer that reads
            sigma(t)), the mixers over t; ConcatOptions, MeanOptions or WeightedOptions, baselines (an MLP on all t
            concatenated, on their mean, on a learned weighted sum). On the command line:
            `--model.head=TransformerOptions --model.head.d_model=64`. Also taken in the form the module's
            hyperparameters hold it (a class path and its init args), so that `load_from_checkpoint` rebuilds it.
        learning_rates: the lr grid; every lr x seed is one member, the lr is selected on validation.
        seeds: probe seeds (set from the data's seeds).
        weight_decay: Adam's L2 weight decay.
        grad_clip: per-member gradient norm clip; None clips the mixers at 1.0 and nothing else.
        num_classes: classes per task (set from the data).
        task_names: names of the tasks (set from the data).
        feature_dim: size of each representation (set from the data).
        times: the t of the representations served (set from the data).
        results_dir: folder of the result files.
        member_chunk: members trained together per forward/backward; None: the whole grid where CUDA is available,
            else a size per kind that keeps a CPU's activations in cache (decided when the module is built, so set
            it to train on the CPU of a GPU machine, or to resume a probe checkpoint on a machine of the other
            kind: the chunks name the weights).
        export_attention: for attention heads, also record attention over t and the masking ablation.
        encoder_name: the pretraining variant's name in tables (a preset's encoder name).
        overwrite_results: replace a result file of the same settings instead of refusing.
    """

    def __init__(
        self,
        head: HeadOptions = MLPOptions(),
        learning_rates: list[float] = PAPER_LEARNING_RATES,
        seeds: list[int] = [0, 1, 2, 3, 4],
        weight_decay: float = 1e-5,
        grad_clip: float | None = None,
        num_classes: list[int] = [10],
        task_names: list[str] | None = None,
        feature_dim: int = 128,
        times: list[float] = [0.5],
        results_dir: str = "results/probes",
        member_chunk: int | None = None,
        export_attention: bool = True,
        encoder_name: str | None = None,
        overwrite_results: bool = False,
    ) -> None:
        super().__init__()
        head = options_from_config(head) if isinstance(head, dict) else head
        self.kind, self.head_options = kind_of_options(head), head
        if not learning_rates or min(learning_rates) <= 0:
            raise TrajrepError(f"learning rates must be positive, got {learning_rates}")
        self.save_hyperparameters()
        # As the CLI's config holds them, however the module was built: plain data, which a checkpoint loads safely.
        self.hparams["head"] = {"class_path": kind_of(self.kind).options_path(), "init_args": dataclasses.asdict(head)}
        self.automatic_optimization = False
        # Mixers are clipped at 1.0 (method §7) unless told otherwise; the MLP-style heads are not.
        self.grad_clip = grad_clip if grad_clip is not None else (1.0 if kind_of(self.kind).mixer else None)
        self.task_names = task_names or [f"task{k}" for k in range(len(num_classes))]
        time_indices = list(range(len(times))) if self.single_time else [None]
        self.members = [
            {"task": k, "time_index": i, "lr": lr, "seed": seed}
            for k, i, lr, seed in itertools.product(range(len(num_classes)), time_indices, learning_rates, seeds)
        ]
        chunk = member_chunk if member_chunk is not None else default_member_chunk(self.kind, len(self.members))
        if chunk < 1:
            raise TrajrepError(f"member_chunk must be >= 1 (members trained together), got {chunk}")
        self.chunks = [slice(start, start + chunk) for start in range(0, len(self.members), chunk)]
        self.heads = torch.nn.ModuleList(self._build_head(self.members[part]) for part in self.chunks)
        if self.exports_attention:
            # Each member's weights at its best validation epoch (in the state dict, so checkpoints carry them):
            # attention and masking analyse the very model whose accuracy the records report.
            self.best_heads = copy.deepcopy(self.heads).requires_grad_(False)
            self.register_buffer("best_val", torch.full((len(self.members),), -1.0))
        self.register_buffer("times", torch.tensor(times, dtype=torch.float32), persistent=False)
        self.register_buffer("member_task", torch.tensor([m["task"] for m in self.members]), persistent=False)
        self.register_buffer("member_seed_row", torch.tensor([seeds.index(m["seed"]) for m in self.members]),
                             persistent=False)
        # Tasks with fewer classes than the widest one get their extra logits masked out.
        classes = torch.tensor(num_classes)[self.member_task]
        self.register_buffer("logit_mask", torch.arange(max(num_classes))[None, :] >= classes[:, None],
                             persistent=False)
        # Members whose training loss went non-finite (kept on the device; read once per epoch, not per step).
        self.register_buffer("diverged", torch.zeros(len(self.members), dtype=torch.bool), persistent=False)
        self._reported_diverged: set[int] = set()
        self.val_accuracy = MemberAccuracy(len(self.members))
        self.test_accuracy = MemberAccuracy(len(self.members))
        self.val_history: list[list[float]] = []
        self.test_history: list[list[float]] = []
        self._subset_generator = torch.Generator().manual_seed(seeds[0])

    @property
    def single_time(self) -> bool:
        """Whether every t of the grid gets its own members (the per-t probes)."""
        return kind_of(self.kind).single_time

    @property
    def exports_attention(self) -> bool:
        return kind_of(self.kind).attention and self.hparams.export_attention

    def _build_head(self, members: list[dict]) -> torch.nn.Module:
        extra = {"time_index": [m["time_index"] for m in members]} if self.single_time else {}
        return build_head(self.kind, self.head_options, num_members=len(members),
                          feature_dim=self.hparams.feature_dim, num_times=len(self.hparams.times),
                          num_classes=[max(self.hparams.num_classes)], seeds=[m["seed"] for m in members], **extra)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None, **head_call) -> Any:
        """Every member's logits (G, B, C) for a shared batch (B, T, d), extra logits of narrower tasks at -inf.
        The heads' call arguments (return_attention, key_mask for the attention heads) pass through; with
        return_attention the result is (logits, attention (G, B, T + 1))."""
        t = self.times if t is None else t
        key_mask = head_call.pop("key_mask", None)
        outputs = [head(x, t, **head_call, **self._chunk_of(key_mask, part))
                   for head, part in zip(self.heads, self.chunks)]
        if head_call.get("return_attention"):
            logits, attention = (torch.cat(parts) for parts in zip(*outputs))
            return self._mask_logits(logits, slice(None)), attention
        return self._mask_logits(torch.cat(outputs), slice(None))

    @staticmethod
    def _chunk_of(key_mask: torch.Tensor | None, part: slice) -> dict:
        """The key_mask argument for one chunk's head: a per-member (G, B, T + 1) mask is sliced to the chunk."""
        if key_mask is None:
            return {}
        return {"key_mask": key_mask[part] if key_mask.dim() == 3 else key_mask}

    def _mask_logits(self, logits: torch.Tensor, part: slice) -> torch.Tensor:
        return logits.masked_fill(self.logit_mask[part, None, :], float("-inf"))

    def member_labels(self, y: torch.Tensor, part: slice, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(G_part, B) labels of the members in `part`, each of its own task: from per-seed labels y (S, B[, K])
        and those members' seed rows, or from labels (B[, K]) shared by all members."""
        tasks = self.member_task[part]
        y = y[rows] if rows is not None else y.unsqueeze(0).expand(len(tasks), *y.shape)
        if y.dim() == 3:
            y = y.gather(2, tasks.view(-1, 1, 1).expand(-1, y.shape[1], 1)).squeeze(2)
        return y

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.grid_step(*batch, self.optimizers(), self.manual_backward)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def grid_step(self, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
                  backward: Callable[[torch.Tensor], None]) -> torch.Tensor:
        """One optimisation step of every member on per-seed batches x (S, B, T, d), y (S, B[, K]); returns the
        mean loss over members. Each chunk's forward and backward run back to back (see the class docstring),
        except under DDP, whose gradient reducer expects one backward per step: there the chunks' losses are
        summed into one backward. Members are clipped after every backward, on the gradients DDP averaged."""
        t, subset = self.times, None
        if self.kind == "continuous":  # one random time subset per step, shared by every member
            subset = random_time_subset(len(t), generator=self._subset_generator).to(t.device)
            t = t[subset]
        one_backward = self._trainer is not None and self.trainer.world_size > 1
        optimizer.zero_grad()
        losses, pending = [], []
        for head, part in zip(self.heads, self.chunks):
            rows = self.member_seed_row[part]
            inputs, labels = head.select_inputs(x, rows), self.member_labels(y, part, rows)
            if subset is not None:
                inputs = inputs[:, :, subset]
            logits = self._mask_logits(head(inputs, t), part)
            loss = member_losses(logits, labels)
            summed = loss.sum()  # the sum keeps every member's gradient its own
            if one_backward:
                pending.append(summed)
            else:
                backward(summed)
            losses.append(loss.detach())
        if pending:
            backward(torch.stack(pending).sum())
        if self.grad_clip is not None:
            for head in self.heads:
                clip_grad_norm_per_member_(head, self.grad_clip)
        optimizer.step()
        losses = torch.cat(losses)
        finite = torch.isfinite(losses)
        self.diverged |= ~finite
        return torch.where(finite, losses, 0).sum() / finite.sum().clamp(min=1)  # over members still training

    def on_train_epoch_end(self) -> None:
        """One warning line per epoch that saw members diverge, naming them."""
        newly = sorted(set(self.diverged.nonzero().flatten().tolist()) - self._reported_diverged)
        if newly:
            self._reported_diverged.update(newly)
            names = ", ".join(sorted({f"lr {self.members[g]['lr']:g}" for g in newly}))
            rank_zero_warn(f"{len(newly)} of {len(self.members)} {self.kind} probe members diverged "
                           f"(non-finite training loss) by epoch {self.current_epoch} ({names}); their records are "
                           "marked diverged and their learning rates are left out of selection")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int,
                        dataloader_idx: int = 0) -> None:
        x, y = batch
        rows = CPU_EVAL_ROWS if x.device.type == "cpu" else len(x)
        predictions = torch.cat([self(part).argmax(dim=-1) for part in x.split(rows)], dim=1)
        metric = self.val_accuracy if dataloader_idx == 0 else self.test_accuracy
        metric.update(predictions, self.member_labels(y, slice(None)))

    def on_validation_epoch_end(self) -> None:
        val, test = self.val_accuracy.compute(), self.test_accuracy.compute()
        self.val_accuracy.reset()
        self.test_accuracy.reset()
        if self.trainer.sanity_checking:
            return
        # reshape: torchmetrics returns a one-member grid's accuracy as a scalar
        self.val_history.append(val.reshape(-1).tolist())
        self.test_history.append(test.reshape(-1).tolist())
        self.log_dict({"val/acc_best_member": val.max(), "val/acc_mean": val.mean()}, prog_bar=True)
        if self.exports_attention:
            self._keep_improved_members(val.reshape(-1))

    @torch.no_grad()
    def _keep_improved_members(self, val: torch.Tensor) -> None:
        """Copy the weights of members whose validation accuracy beat their best so far (strictly: the first best
        epoch, as in model selection) into `best_heads`."""
        improved = val.to(self.best_val.device) > self.best_val
        self.best_val = torch.where(improved, val.to(self.best_val.device), self.best_val)
        for head, best, part in zip(self.heads, self.best_heads, self.chunks):
            rows = improved[part]
            for weights, kept in zip(head.parameters(), best.parameters()):
                kept[rows] = weights[rows]

    @contextmanager
    def best_epoch_weights(self) -> Iterator[None]:
        """Run the heads with each member's best-epoch weights inside the block; the trained ones come back after."""
        trained, self.heads = self.heads, self.best_heads
        try:
            yield
        finally:
            self.heads = trained

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["probe_history"] = {"val": self.val_history, "test": self.test_history,
                                       "diverged": self.diverged.tolist()}
        # The streams of dropout and of the mixers' time subsets: a resumed grid trains as a straight one.
        checkpoint["rng_state"] = {"cpu": torch.get_rng_state(), "time_subsets": self._subset_generator.get_state()}
        if torch.cuda.is_available():
            checkpoint["rng_state"]["cuda"] = torch.cuda.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.val_history = checkpoint["probe_history"]["val"]
        self.test_history = checkpoint["probe_history"]["test"]
        if "diverged" in checkpoint["probe_history"]:
            self.diverged = torch.tensor(checkpoint["probe_history"]["diverged"], device=self.diverged.device)
        state = checkpoint.get("rng_state")
        if state is not None:
            torch.set_rng_state(state["cpu"])
            self._subset_generator.set_state(state["time_subsets"])
            if "cuda" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state(state["cuda"])

    def member_records(self) -> list[dict]:
        """One record per member: its configuration, best validation epoch, and accuracies at that epoch."""
        if not self.val_history:
            raise TrajrepError("the probe grid has no validation results; train for at least one epoch with "
                               "validation enabled (limit_val_batches > 0)")
        epochs, val, test = best_epochs(np.array(self.val_history), np.array(self.test_history))
        diverged = self.diverged.tolist()
        return [{
            "probe": self.kind,
            "task": self.task_names[m["task"]],
            "time": None if m["time_index"] is None else self.hparams.times[m["time_index"]],
            "lr": m["lr"],
            "seed": m["seed"],
            "best_epoch": int(epochs[g]),
            "val_acc": float(val[g]),
            "test_acc": float(test[g]),
            **({"diverged": True} if diverged[g] else {}),
        } for g, m in enumerate(self.members)]

    def setup(self, stage: str) -> None:
        """The continuous head's time code reads sigma(t) of the noise process the cache names (its manifest's
        sigma_min, sigma_max), not a default; data without one (in-memory tensors) keeps the head's own. A sigma
        given in the head's options that disagrees with the cache is refused."""
        if self.single_time:
            require_each_t_once(self.kind, self.trainer.datamodule)
        noise = getattr(self.trainer.datamodule, "metadata", {}).get("sde")
        if self.kind == "continuous" and noise is not None:
            given = {key: getattr(self.head_options, key) for key in ("sigma_min", "sigma_max")
                     if getattr(self.head_options, key) is not None}
            if any(noise[key] != value for key, value in given.items()):
                raise TrajrepError(f"head options {given} disagree with the noise process of the cache "
                                   f"({noise}); leave sigma_min and sigma_max out, the head reads them from the data")
            for heads in (self.heads, getattr(self, "best_heads", [])):
                for head in heads:
                    head.sde = VESDE(noise["sigma_min"], noise["sigma_max"])

    def configure_callbacks(self) -> list[pl.Callback]:
        """What is reported once the grid is trained: its result file (trajrep.probe.evaluation)."""
        return [ProbeResults()]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = [{"params": head.parameters(), "lr": [m["lr"] for m in self.members[part]]}
                  for head, part in zip(self.heads, self.chunks)]
        return GroupedAdam(groups, weight_decay=self.hparams.weight_decay)
