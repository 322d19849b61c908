"""The paper-style table and figures, built from probe result files alone.

    python -m trajrep.report RESULTS_DIR [--out DIR] [--wandb-project P --wandb-group G]

A row is one (dataset, encoder, d_z, pretraining steps, grid granularity g, task); an encoder is its variant name
(else its pretraining mode), prefixed with "untrained" for the randomly initialised control (0 pretraining steps),
or "pixels" for the raw-pixel control.
A cell is the mean ± std over pretraining seeds of the probe's selected test accuracy (for `mlp`, at the best
single t chosen on validation).
"mixer - best t" is the mean difference over pretraining seeds with a 95 % t-interval (none with one seed).
"CKA across t" is the mean linear CKA between the representations at two different times (trajrep.similarity).
"""

import argparse
import csv
import math
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np
import torch
from scipy import stats

from trajrep.checks import ensure_wandb_ready
from trajrep.errors import TrajrepError, errors_as_one_line
from trajrep.results import read_results
from trajrep.similarity import mean_off_diagonal

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

COLUMNS = {"mlp": "best single t", "concat": "concat", "mean": "mean", "weighted": "weighted", "gru": "GRU",
           "transformer": "Transformer", "continuous": "continuous"}
MIXERS = ("gru", "transformer", "continuous")
ROW_FIELDS = ("dataset", "encoder", "latent_dim", "steps", "g", "task")


def encoder_label(context: dict) -> str:
    if context.get("encoder_mode") == "pixels":
        return "pixels"
    name = str(context.get("encoder_name") or context.get("encoder_mode"))
    return f"untrained {name}" if context.get("pretrain_steps") == 0 else name


def row_order(row: tuple) -> tuple:
    """Sort key: numbers numerically (g = 2 before 10), then text."""
    return tuple((0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value)) for value in row)


class Collected:
    """Selected accuracies per (row, probe), MLP test (and validation) accuracies per (row, t) and the
    Transformer's mean attention (overall and per class) and masking ablation per row, each keyed by pretraining
    seed."""

    def __init__(self) -> None:
        self.cells: dict[tuple, dict[str, dict]] = defaultdict(lambda: defaultdict(dict))
        self.per_time: dict[tuple, dict[float, dict]] = defaultdict(lambda: defaultdict(dict))
        self.per_time_val: dict[tuple, dict[float, dict]] = defaultdict(lambda: defaultdict(dict))
        self.attention: dict[tuple, dict] = defaultdict(dict)
        self.masking: dict[tuple, dict] = defaultdict(dict)
        self.attention_per_class: dict[tuple, dict] = defaultdict(dict)
        self.cka: dict[tuple, dict] = defaultdict(dict)
        self.times: dict[tuple, list[float]] = {}

    def add(self, results: dict, path: Path) -> None:
        context, summary = results["context"], results["summary"]
        probe, seed = context["probe"], context.get("pretrain_seed")
        for task, selected in summary.items():
            grid = len(context["times"]) - 1 if len(context["times"]) > 1 else "-"
            steps = "-" if context.get("pretrain_steps") is None else context["pretrain_steps"]
            row = (context.get("dataset"), encoder_label(context), context.get("latent_dim"), steps, grid, task)
            if seed in self.cells[row][probe]:
                raise TrajrepError(f"{path} repeats {probe} for pretraining seed {seed} of row {row}; remove the "
                                   "stale result file")
            self.cells[row][probe][seed] = selected["test_acc_mean"]
            if "linear_cka" in context:
                self.cka[row][seed] = mean_off_diagonal(torch.tensor(context["linear_cka"]))
            for entry in selected.get("per_time", []):
                self.per_time[row][entry["time"]][seed] = entry["test_acc_mean"]
                self.per_time_val[row][entry["time"]][seed] = entry["val_acc_mean"]
            chosen = [r["attention"] for r in results["records"]
                      if r["task"] == task and r["lr"] == selected["lr"] and "attention" in r]
            if chosen and probe == "transformer":
                self.attention[row][seed] = np.mean(chosen, axis=0).tolist()
                self.times[row] = context["times"]
            by_class = [r["attention_per_class"] for r in results["records"]
                        if r["task"] == task and r["lr"] == selected["lr"] and "attention_per_class" in r]
            if by_class and probe == "transformer":  # classes present in the test split: the same for every seed
                classes = [c for c, weights in enumerate(by_class[0]) if weights is not None]
                self.attention_per_class[row][seed] = {"classes": classes, "weights": np.mean(
                    [[weights[c] for c in classes] for weights in by_class], axis=0).tolist()}
            masked = [r["masking"] for r in results["records"]
                      if r["task"] == task and r["lr"] == selected["lr"] and "masking" in r]
            if masked and probe == "transformer":
                self.masking[row][seed] = {name: np.mean([m[name] for m in masked], axis=0).tolist()
                                           for name in masked[0]}


def collect(results_dir: str | Path) -> Collected:
    """Every result file under `results_dir` (checked against its checksum)."""
    collected = Collected()
    for path in sorted(Path(results_dir).rglob("*.json")):
        collected.add(read_results(path), path)
    return collected


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std (None for a single value)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def difference_interval(mixer: list[float], single: list[float]) -> tuple[float, float | None]:
    """Mean of mixer - best t over paired pretraining seeds and the half-width of its 95 % t-interval."""
    differences = np.array(mixer) - np.array(single)
    if len(differences) < 2:
        return float(differences.mean()), None
    half = stats.t.ppf(0.975, len(differences) - 1) * differences.std(ddof=1) / math.sqrt(len(differences))
    return float(differences.mean()), float(half)


def table_rows(collected: Collected) -> list[dict]:
    """One dict per row: its fields, then per probe (mean, std, seeds) and per mixer (difference, half-width)
    over the pretraining seeds that both the mixer and the MLP have."""
    rows = []
    for row in sorted(collected.cells, key=row_order):
        cells = collected.cells[row]
        entry = dict(zip(ROW_FIELDS, row))
        for probe in COLUMNS:
            values = list(cells.get(probe, {}).values())
            entry[probe] = (*mean_std(values), len(values)) if values else None
        cka = list(collected.cka.get(row, {}).values())
        entry["cka"] = float(np.mean(cka)) if cka else None
        for mixer in MIXERS:
            seeds = sorted(set(cells.get(mixer, {})) & set(cells.get("mlp", {})), key=str)
            entry[f"{mixer}-best_t"] = difference_interval([cells[mixer][s] for s in seeds],
                                                           [cells["mlp"][s] for s in seeds]) if seeds else None
        rows.append(entry)
    return rows


def _cell(value: tuple | None) -> str:
    """mean ± std in percent; a single seed has no spread to show."""
    if value is None:
        return ""
    return f"{100 * value[0]:.2f}" + (f" ± {100 * value[1]:.2f}" if value[2] > 1 else "")


def _difference(value: tuple | None) -> str:
    if value is None:
        return ""
    return f"{100 * value[0]:+.2f}" + ("" if value[1] is None else f" ± {100 * value[1]:.2f}")


def _text_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = [*ROW_FIELDS, *COLUMNS.values(), *(f"{COLUMNS[m]} - best t" for m in MIXERS), "CKA across t"]
    body = [[str(row[f]) for f in ROW_FIELDS] + [_cell(row[p]) for p in COLUMNS]
            + [_difference(row[f"{m}-best_t"]) for m in MIXERS]
            + ["" if row["cka"] is None else f"{row['cka']:.3f}"] for row in rows]
    return header, body


def write_tables(rows: list[dict], out: Path) -> None:
    """table.md, table.csv (numbers unrounded) and table.tex."""
    header, body = _text_table(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    seeds = sorted({row[p][2] for row in rows for p in COLUMNS if row[p]})
    note = (f"Test accuracy (%), mean ± std over pretraining seeds (n = {', '.join(map(str, seeds))}); "
            "differences with a 95 % t-interval over paired seeds. CKA across t: mean linear CKA between the "
            "test representations at every two times of the grid (1 = the same representation at every t).")
    (out / "table.md").write_text("\n".join([note, "", *lines]) + "\n")
    with open(out / "table.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*ROW_FIELDS, *(f"{p}_{s}" for p in COLUMNS for s in ("mean", "std", "seeds")),
                         *(f"{m}_minus_best_t_{s}" for m in MIXERS for s in ("mean", "ci95")), "cka_mean"])
        for row in rows:
            writer.writerow([row[f] for f in ROW_FIELDS]
                            + ["" if v is None else v for p in COLUMNS for v in (row[p] or ("", "", ""))]
                            + ["" if v is None else v for m in MIXERS for v in (row[f"{m}-best_t"] or ("", ""))]
                            + ["" if row["cka"] is None else row["cka"]])
    escape = str.maketrans({"_": r"\_", "%": r"\%", "±": r"$\pm$"})
    tex = [r"\begin{tabular}{" + "l" * len(ROW_FIELDS) + "r" * (len(header) - len(ROW_FIELDS)) + "}", r"\hline",
           " & ".join(h.translate(escape) for h in header) + r" \\", r"\hline"]
    tex += [" & ".join(c.translate(escape) for c in cells) + r" \\" for cells in body]
    (out / "table.tex").write_text("\n".join([*tex, r"\hline", r"\end{tabular}"]) + "\n")


def panels(keys: list[tuple]) -> tuple[plt.Figure, list[plt.Axes]]:
    columns = min(len(keys), 4)
    rows = math.ceil(len(keys) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    return figure, list(axes.flat)


def plot_accuracy_vs_t(collected: Collected, path: Path) -> None:
    """MLP test accuracy at every t (mean ± std over pretraining seeds), mixers as horizontal lines."""
    keys = [row for row in sorted(collected.per_time, key=row_order)
            if len(collected.per_time[row]) > 1]  # not the pixel control's single "time"
    if not keys:
        return
    figure, axes = panels(keys)
    for ax, row in zip(axes, keys):
        times = sorted(collected.per_time[row])
        stats_at = [mean_std(list(collected.per_time[row][t].values())) for t in times]
        means = 100 * np.array([mean for mean, _ in stats_at])
        stds = 100 * np.array([std or 0.0 for _, std in stats_at])
        ax.plot(times, means, "o-", color="black", label="MLP at t")
        ax.fill_between(times, means - stds, means + stds, color="black", alpha=0.15)
        for mixer, colour in zip(MIXERS + ("concat",), ("tab:blue", "tab:red", "tab:green", "tab:grey")):
            if collected.cells[row].get(mixer):
                ax.axhline(100 * np.mean(list(collected.cells[row][mixer].values())), color=colour, ls="--",
                           label=COLUMNS[mixer])
        ax.set(title=" / ".join(map(str, row)), xlabel="t", ylabel="test accuracy (%)")
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_attention_over_t(collected: Collected, path: Path) -> None:
    """The Transformer's CLS attention over the time tokens (selected lr, mean over probe seeds), ± std over
    pretraining seeds; the weight on the CLS key itself is left out."""
    keys = sorted(collected.attention, key=row_order)
    if not keys:
        return
    figure, axes = panels(keys)
    for ax, row in zip(axes, keys):
        weights = np.array(list(collected.attention[row].values()))[:, :-1]
        times = collected.times[row]
        ax.errorbar(times, weights.mean(axis=0), yerr=weights.std(axis=0, ddof=1) if len(weights) > 1 else None,
                    fmt="o-", capsize=2)
        ax.set(title=" / ".join(map(str, row)), xlabel="t", ylabel="CLS attention")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def log_wandb_run(logged: dict, figures: list[Path], project: str, group: str, job_type: str,
                  run_dir: Path) -> None:
    """One W&B run named `job_type`-`group`: the `logged` tables and plots, and the `figures` as images."""
    import wandb

    run_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, group=group, job_type=job_type, dir=str(run_dir), name=f"{job_type}-{group}")
    run.log({**logged, **{path.stem: wandb.Image(str(path)) for path in figures}})
    run.finish()


def log_to_wandb(rows: list[dict], collected: Collected, out: Path, project: str, group: str,
                 run_dir: Path) -> None:
    """The results table and the accuracy-vs-t line plot as W&B tables, the figures as images (one run)."""
    import wandb

    header, body = _text_table(rows)
    points = wandb.Table(columns=["row", "t", "test_acc"], data=[
        [" / ".join(map(str, row)), t, 100 * float(np.mean(list(values.values())))]
        for row, by_time in collected.per_time.items() for t, values in sorted(by_time.items())])
    logged = {
        "results_table": wandb.Table(columns=header, data=body),
        "accuracy_vs_t_table": points,
        "accuracy_vs_t": wandb.plot.line(points, "t", "test_acc", stroke="row", title="MLP test accuracy over t"),
    }
    figures = [out / f"{name}.png" for name in ("accuracy_vs_t", "attention_over_t") if (out / f"{name}.png").exists()]
    log_wandb_run(logged, figures, project, group, "report", run_dir)


def report(results_dir: str | Path, out: str | Path | None = None, wandb_project: str | None = None,
           wandb_group: str | None = None, wandb_dir: str | Path = "runs") -> Path:
    """Write table.md/csv/tex and the figures for every result file under `results_dir`; returns the out folder."""
    out = Path(out or results_dir)
    out.mkdir(parents=True, exist_ok=True)
    collected = collect(results_dir)
    rows = table_rows(collected)
    write_tables(rows, out)
    plot_accuracy_vs_t(collected, out / "accuracy_vs_t.png")
    plot_attention_over_t(collected, out / "attention_over_t.png")
    if wandb_project:
        log_to_wandb(rows, collected, out, wandb_project, wandb_group or out.name, Path(wandb_dir))
    return out


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the results table and figures from probe result files.")
    parser.add_argument("results_dir")
    parser.add_argument("--out", default=None, help="output folder (default: results_dir)")
    parser.add_argument("--wandb-project", default=None)
    parser.add_argument("--wandb-group", default=None)
    parser.add_argument("--wandb-dir", default="runs", help="where the W&B run folder goes (not under results/)")
    options = parser.parse_args(args)
    with errors_as_one_line():
        if options.wandb_project:
            ensure_wandb_ready()
        out = report(options.results_dir, options.out, options.wandb_project, options.wandb_group, options.wandb_dir)
    print(out / "table.md")


if __name__ == "__main__":
    main()
