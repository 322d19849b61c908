"""What a probe grid reports once it is trained, as a callback the ProbeModule brings along: the result file, and
for the attention heads each member's attention over t and its masking ablation (method §9), both computed with the
member's weights at its best validation epoch, the epoch its accuracy comes from. It all runs on rank 0 only."""

from typing import TYPE_CHECKING

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from trajrep.probe.records import ensure_results_can_be_written, result_context, write_results
from trajrep.probe.selection import summarise
from trajrep.progress import Ticker, duration

if TYPE_CHECKING:
    from trajrep.probe.module import ProbeModule


@torch.no_grad()
def mean_test_attention(module: "ProbeModule") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each member's CLS attention over the time tokens (CLS key last), averaged over heads, with the module's
    current weights: over all test examples (G, T + 1), per class of its task (G, C, T + 1), and the number of
    test examples per class (G, C)."""
    was_training, total, count = module.training, 0.0, 0
    per_class, class_count = 0.0, 0.0
    module.eval()
    for x, y in module.trainer.datamodule.test_dataloader():
        _, attention = module(x.to(module.device), return_attention=True)
        labels = module.member_labels(y.to(module.device), slice(None))
        one_hot = F.one_hot(labels, module.logit_mask.shape[1]).float()
        per_class = per_class + torch.einsum("gbc,gbt->gct", one_hot, attention)
        class_count = class_count + one_hot.sum(dim=1)
        total, count = total + attention.sum(dim=1), count + x.shape[0]
    module.train(was_training)
    return total / count, per_class / class_count.clamp_min(1)[:, :, None], class_count


@torch.no_grad()
def masked_test_accuracy(module: "ProbeModule") -> dict[str, torch.Tensor]:
    """The masking ablation (method §9) on the test split, with the module's current weights: "full" (G, 1),
    accuracy with nothing hidden; "drop" (G, T + 1), with one key hidden from attention (time token i, or the CLS
    key last); "keep_only" (G, T), accuracy when time token i is the only time token left (the CLS key stays)."""
    num_times = len(module.hparams.times)
    eye = torch.eye(num_times + 1, dtype=torch.bool, device=module.device)
    masks = {"full": [None], "drop": list(eye), "keep_only": [~row & ~eye[num_times] for row in eye[:num_times]]}
    correct = {name: torch.zeros(len(module.members), len(rows), device=module.device)
               for name, rows in masks.items()}
    was_training, count = module.training, 0
    module.eval()
    loader = module.trainer.datamodule.test_dataloader()
    # 2 T + 2 passes over the test split after training: long enough to need its own progress lines.
    ticker = Ticker(f"masking ablation ({2 * num_times + 2} masks), test batch", len(loader))
    for done, (x, y) in enumerate(loader, start=1):
        x, labels = x.to(module.device), module.member_labels(y.to(module.device), slice(None))
        for name, rows in masks.items():
            for i, mask in enumerate(rows):
                predictions = module(x, key_mask=mask).argmax(dim=-1)
                correct[name][:, i] += (predictions == labels).sum(dim=1)
        count += x.shape[0]
        ticker.tick(done)
    rank_zero_info(f"masking ablation done: {len(loader)} test batches in {duration(ticker.seconds)}")
    module.train(was_training)
    return {name: values / count for name, values in correct.items()}


def attention_fields(module: "ProbeModule") -> list[dict]:
    """Per member, what its record adds: attention over t (overall and per class) and the masking ablation, with
    its best-epoch weights."""
    with module.best_epoch_weights():
        masked = {name: values.tolist() for name, values in masked_test_accuracy(module).items()}
        attention, per_class, class_count = (values.tolist() for values in mean_test_attention(module))
    return [{"attention": attention[g],
             "attention_per_class": [weights if n > 0 else None  # a class absent from the test split
                                     for weights, n in zip(per_class[g], class_count[g])],
             "masking": {name: values[g] for name, values in masked.items()}} for g in range(len(module.members))]


class ProbeResults(pl.Callback):
    """Checks before training that the results can be written (so a finished grid never fails at its last line),
    and writes them when training ends: one record per member, selected on validation (trajrep.probe.selection)."""

    def on_fit_start(self, trainer: pl.Trainer, module: "ProbeModule") -> None:
        ensure_results_can_be_written(module, module.kind)

    def on_fit_end(self, trainer: pl.Trainer, module: "ProbeModule") -> None:
        if not trainer.is_global_zero:
            return
        records = module.member_records()
        context = result_context(module, module.kind, len(module.val_history))
        if module.exports_attention:
            for record, fields in zip(records, attention_fields(module)):
                record.update(fields)
            context["attention_weights"] = "best_epoch"
        path = write_results(module.hparams.results_dir, records, summarise(records, len(module.val_history)),
                             context, overwrite=module.hparams.overwrite_results)
        rank_zero_info(f"Probe results ({len(records)} members) -> {path}")  # shown with or without a bar
