"""Model selection of the probe protocol (SPEC §7), on validation accuracy only.

For every member (one probe configuration) keep the epoch with the best validation accuracy and the test accuracy
at that epoch; per task (and, for single-t probes, per t) pick the learning rate with the best mean validation
accuracy over seeds and report mean and std of test accuracy at that rate. The best single t is chosen the same
way, on validation; test accuracy never takes part in any choice.
"""

from collections import defaultdict

import numpy as np


def best_epochs(val_history: np.ndarray, test_history: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per member: (first epoch of best validation accuracy, its validation accuracy, test accuracy then).

    Histories are (epochs, members).
    """
    epochs = val_history.argmax(axis=0)
    members = np.arange(val_history.shape[1])
    return epochs, val_history[epochs, members], test_history[epochs, members]


def _select_lr(records: list[dict]) -> dict:
    by_lr = defaultdict(list)
    for record in records:
        by_lr[record["lr"]].append(record)
    lr = max(by_lr, key=lambda rate: (np.mean([r["val_acc"] for r in by_lr[rate]]), -rate))
    chosen = by_lr[lr]
    tests = np.array([r["test_acc"] for r in chosen])
    return {
        "lr": lr,
        "val_acc_mean": float(np.mean([r["val_acc"] for r in chosen])),
        "test_acc_mean": float(tests.mean()),
        "test_acc_std": float(tests.std(ddof=1)) if len(tests) > 1 else 0.0,
        "num_seeds": len(chosen),
    }


def summarise(records: list[dict]) -> dict[str, dict]:
    """Per task: the selected configuration; for single-t probes also every t and the val-selected best t."""
    by_task = defaultdict(lambda: defaultdict(list))
    for record in records:
        by_task[record["task"]][record["time"]].append(record)
    summary = {}
    for task, by_time in by_task.items():
        if list(by_time) == [None]:
            summary[task] = _select_lr(by_time[None])
            continue
        per_time = [{"time": t, **_select_lr(group)} for t, group in sorted(by_time.items())]
        best = max(per_time, key=lambda entry: entry["val_acc_mean"])
        summary[task] = {**best, "per_time": per_time}
    return summary
