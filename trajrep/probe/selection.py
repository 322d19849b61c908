"""Model selection of the probe protocol (method §7), on validation accuracy only.

For every member (one probe configuration) keep the epoch with the best validation accuracy and the test accuracy
at that epoch; per task (and, for single-t probes, per t) pick the learning rate with the best mean validation
accuracy over seeds and report mean and std of test accuracy at that rate. The best single t is chosen the same
way, on validation; test accuracy never takes part in any choice. Summaries also say whether the selection can be
trusted: a setting at the edge of its grid, or members that peak at their last epoch, mean the grid or the
training was too short. A learning rate at which any member diverged (non-finite loss) is never selected.
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


def _select(records: list[dict], epochs: int | None) -> dict:
    """The setting (lr, or k for the kNN probe) with the best mean validation accuracy over seeds, its test
    accuracy, and whether the protocol converged: the lr at an edge of its grid (a wider grid might do better;
    a grid of fewer than 3 rates cannot bracket) and the fraction of members whose best epoch is the last one
    (longer training might do better)."""
    key = "k" if "k" in records[0] else "lr"
    by_setting = defaultdict(list)
    for record in records:
        by_setting[record[key]].append(record)
    # A setting where any member diverged is left out, so a mean over its surviving seeds cannot win.
    diverged = sorted(v for v, group in by_setting.items() if any(r.get("diverged") for r in group))
    stable = [v for v in by_setting if v not in diverged] or list(by_setting)
    value = max(stable, key=lambda v: (np.mean([r["val_acc"] for r in by_setting[v]]), -v))
    chosen = by_setting[value]
    tests = np.array([r["test_acc"] for r in chosen])
    selected = {
        key: value,
        "val_acc_mean": float(np.mean([r["val_acc"] for r in chosen])),
        "test_acc_mean": float(tests.mean()),
        "test_acc_std": float(tests.std(ddof=1)) if len(tests) > 1 else 0.0,
        "num_seeds": len(chosen),
    }
    if diverged:
        selected["diverged_settings"] = diverged
    if key == "lr":  # k of the kNN probe is the field's fixed pair (20, 200), not a search
        # A diverged rate still brackets: it shows that the grid goes far enough on its side.
        selected["at_grid_edge"] = len(by_setting) < 3 or value in (min(by_setting), max(by_setting))
    if epochs is not None:
        selected["last_epoch_fraction"] = last_epoch_fraction(records, epochs)
    return selected


def best_block(val_acc: dict[str, float], blocks: list[str]) -> str:
    """The block with the best validation accuracy; a tie goes to the block that comes first in `blocks` (the
    backbone's order, as the cache's manifest names them), so the preset's mixers and the report choose alike."""
    return max(val_acc, key=lambda block: (val_acc[block], -blocks.index(block)))


def last_epoch_fraction(records: list[dict], epochs: int) -> float:
    """The fraction of members whose best validation epoch is the last one."""
    return float(np.mean([r["best_epoch"] == epochs - 1 for r in records]))


def summarise(records: list[dict], epochs: int | None = None) -> dict[str, dict]:
    """Per task: the selected configuration; for single-t probes also every t and the val-selected best t.
    `epochs` (of a trained probe) adds the fraction of members whose best epoch is the last one."""
    by_task = defaultdict(lambda: defaultdict(list))
    for record in records:
        by_task[record["task"]][record["time"]].append(record)
    summary = {}
    for task, by_time in by_task.items():
        if list(by_time) == [None]:
            summary[task] = _select(by_time[None], epochs)
            continue
        per_time = [{"time": t, **_select(group, epochs)} for t, group in sorted(by_time.items())]
        best = max(per_time, key=lambda entry: entry["val_acc_mean"])
        summary[task] = {**best, "per_time": per_time}
        if epochs is not None:  # over every member of the task, all times
            summary[task]["last_epoch_fraction"] = last_epoch_fraction(
                [r for group in by_time.values() for r in group], epochs)
    return summary
