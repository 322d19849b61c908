"""The kNN probe of the self-supervised field, at every t: no training, so it cannot be under- or over-fitted.

    trajrep validate --config configs/probe/knn.yaml

Each validation or test representation at time t is classified by its k nearest training representations at the
same t under cosine similarity, each neighbour voting with weight exp(similarity / temperature) (Wu et al., 2018;
the protocol of DINO and lightly's KNNClassifier). k is chosen per t on validation, like a probe's lr, and the
best single t on validation too (trajrep.probe.selection).
"""

import itertools

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from trajrep.errors import TrajrepError
from trajrep.probe.module import MemberAccuracy, require_each_t_once
from trajrep.probe.records import ensure_results_can_be_written, result_context, write_results
from trajrep.probe.selection import summarise


def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                ks: list[int], temperature: float) -> torch.Tensor:
    """Predicted classes (len(ks), B) of `queries` (B, d) from a labelled `bank` (N, d), by cosine similarity
    and temperature-weighted votes of the k nearest neighbours, for every k."""
    similarity = F.normalize(queries, dim=-1) @ F.normalize(bank, dim=-1).T
    nearest, rows = similarity.topk(min(max(ks), len(bank)), dim=-1)  # sorted: the first k are the k nearest
    votes = F.one_hot(bank_labels[rows], num_classes).to(nearest.dtype) * (nearest / temperature).exp()[..., None]
    return torch.stack([votes[:, :k].sum(dim=1).argmax(dim=-1) for k in ks])


class KNNProbe(pl.LightningModule):
    """kNN classification of every task at every t and every k, on validation and test, written as records.

    Run with `trajrep validate`: the training split of the datamodule is the neighbour bank, the validation
    loaders are its val and test splits. The arguments after `temperature` are linked from the datamodule.

    Args:
        ks: the neighbour counts k, each reported.
        temperature: of the exp(similarity / temperature) weights of the neighbours' votes.
        num_classes: classes per task (set from the data).
        task_names: names of the tasks (set from the data).
        feature_dim: size of each representation (set from the data).
        times: the t of the representations served (set from the data).
        seeds: set from the data; unused (kNN draws nothing at random).
        results_dir: folder of the result files.
        encoder_name: the pretraining variant's name in tables (a preset's encoder name).
        overwrite_results: replace a result file of the same settings instead of refusing.
    """

    def __init__(
        self,
        ks: list[int] = [20, 200],
        temperature: float = 0.07,
        num_classes: list[int] = [10],
        task_names: list[str] | None = None,
        feature_dim: int = 128,
        times: list[float] = [0.5],
        seeds: list[int] = [0],
        results_dir: str = "results/probes",
        encoder_name: str | None = None,
        overwrite_results: bool = False,
    ) -> None:
        super().__init__()
        if not ks or min(ks) < 1:
            raise TrajrepError(f"ks must list neighbour counts >= 1, got {ks}")
        if temperature <= 0:
            raise TrajrepError(f"temperature must be positive, got {temperature}")
        self.save_hyperparameters()
        self.task_names = task_names or [f"task{k}" for k in range(len(num_classes))]
        self.members = [{"task": task, "time_index": i, "k": k}
                        for task, i, k in itertools.product(range(len(num_classes)), range(len(times)), ks)]
        self.val_accuracy = MemberAccuracy(len(self.members))
        self.test_accuracy = MemberAccuracy(len(self.members))
        self._bank: tuple[torch.Tensor, torch.Tensor] | None = None

    def on_validation_start(self) -> None:
        ensure_results_can_be_written(self, "knn")
        require_each_t_once("knn", self.trainer.datamodule)
        x, y = self.trainer.datamodule.tensors("train")
        self._bank = x.to(self.device), y.reshape(len(y), -1).to(self.device)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int,
                        dataloader_idx: int = 0) -> None:
        x, y = batch
        y = y.reshape(len(y), -1)
        bank, bank_labels = self._bank
        predictions = torch.cat([
            knn_predict(bank[:, i], bank_labels[:, task], x[:, i], self.hparams.num_classes[task],
                        self.hparams.ks, self.hparams.temperature)
            for task in range(len(self.hparams.num_classes)) for i in range(len(self.hparams.times))])
        labels = torch.stack([y[:, m["task"]] for m in self.members])
        metric = self.val_accuracy if dataloader_idx == 0 else self.test_accuracy
        metric.update(predictions, labels)

    def on_validation_end(self) -> None:
        val, test = (metric.compute().reshape(-1).tolist() for metric in (self.val_accuracy, self.test_accuracy))
        self._bank = None
        if not self.trainer.is_global_zero:
            return
        records = [{"probe": "knn", "task": self.task_names[m["task"]], "time": self.hparams.times[m["time_index"]],
                    "k": m["k"], "seed": None, "best_epoch": None, "val_acc": val[g], "test_acc": test[g]}
                   for g, m in enumerate(self.members)]
        context = result_context(self, "knn", epochs=None)
        path = write_results(self.hparams.results_dir, records, summarise(records), context,
                             overwrite=self.hparams.overwrite_results)
        rank_zero_info(f"kNN results ({len(records)} settings) -> {path}")
