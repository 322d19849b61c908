"""The paper-style table and figures, built from probe result files alone.

    python -m trajrep.report RESULTS_DIR [--out DIR] [--wandb-project P --wandb-group G]

A row is one (dataset, encoder, d_z, pretraining steps, grid granularity g, task); an encoder is its variant name
(else its pretraining mode), prefixed with "untrained" for the randomly initialised control (0 pretraining steps),
or "pixels" for the raw-pixel control.
A cell is the mean ± std over pretraining seeds of the probe's selected test accuracy (for `mlp`, at the best
single t chosen on validation).
Denoiser features have a row per block ("encoder @ block", the single-t probes of that block) and a row of the
encoder without a block: there the single-t probes are at the (block, t) best on validation, as DDAE picks them
by hand, the mixers at the block the MLP chose, and the Transformer over (layer, t) reads every block at every t.
"mixer - best t" is the mean difference over pretraining seeds with a 95 % t-interval (none with one seed).
"CKA across t" is the mean linear CKA between the representations at two different times (trajrep.similarity).
"""

import argparse
import csv
import math
from collections import Counter, defaultdict
from pathlib import Path

import matplotlib
import numpy as np
import torch
from scipy import stats

from trajrep.checks import ensure_wandb_ready
from trajrep.diffusion import VESDE
from trajrep.errors import TrajrepError, errors_as_one_line
from trajrep.kinds import KINDS
from trajrep.results import probe_label, read_results
from trajrep.similarity import mean_off_diagonal
from trajrep.timegrid import grid_label

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)



def base_kind(column: str) -> str:
    """The probe kind of a column: "transformer" for "transformer-replicated" and "transformer-layers"."""
    return column.removesuffix("-replicated").removesuffix("-layers")


def columns() -> dict[str, str]:
    """Every column a table can have, with its label: each probe kind (trajrep.kinds, in its order), then each kind
    over every t with its best single t replicated at every position, then each over (layer, t) tokens."""
    kinds = {name: kind.column for name, kind in KINDS.items()}
    over_t = [name for name, kind in KINDS.items() if not kind.single_time]
    return {**kinds, **{f"{name}-replicated": f"{kinds[name]}, best t replicated" for name in over_t},
            **{f"{name}-layers": f"{kinds[name]} over (layer, t)" for name in over_t}}


def mixer_columns() -> list[str]:
    """The columns of mixers (over t or over (layer, t)), each compared to the best single t."""
    return [column for column in columns() if KINDS[base_kind(column)].mixer and "-replicated" not in column]


def differences() -> list[tuple[str, str, str]]:
    """(column, baseline, label) of each difference the table reports with a 95 % interval over paired pretraining
    seeds: every mixer minus the best single t, then every kind minus its replicated best t (mixers first)."""
    labels = columns()
    replicated = sorted((column for column in labels if column.endswith("-replicated")),
                        key=lambda column: not KINDS[base_kind(column)].mixer)
    return [*((column, "mlp", f"{labels[column]} - best t") for column in mixer_columns()),
            *((base_kind(column), column, f"{labels[base_kind(column)]} - replicated best t")
              for column in replicated)]

# A probe whose members mostly peak at their last epoch, or whose selected lr (or k) is at the edge of its grid.
UNCONVERGED_FRACTION = 0.5
ROW_FIELDS = ("dataset", "encoder", "latent_dim", "steps", "g", "task")
CHOSEN = "MLP's (layer, t)"  # of a denoiser's encoder row: the block and t chosen on validation


def encoder_label(context: dict, per_layer: bool = True) -> str:
    """The encoder column; a probe of one block of denoiser features (not one at the chosen block) gets the
    block's own row, "encoder @ block", unless `per_layer` is false."""
    if context.get("encoder_mode") == "pixels":
        return "pixels"
    name = str(context.get("encoder_name") or context.get("encoder_mode"))
    if per_layer and _of_one_block(context):
        name = f"{name} @ {context['layer']}"
    return f"untrained {name}" if context.get("pretrain_steps") == 0 else name


def _of_one_block(context: dict) -> bool:
    return bool(context.get("layer")) and not context.get("layer_selection")


def row_order(row: tuple) -> tuple:
    """Sort key: numbers numerically (g = 2 before 10), then text."""
    return tuple((0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value)) for value in row)


class Collected:
    """Selected accuracies per (row, probe), MLP test (and validation) accuracies per (row, t) and the
    Transformer's mean attention (overall and per class) and masking ablation per row, each keyed by pretraining
    seed; for denoiser features also each block's single-t records (the candidates of the (block, t) chosen on
    validation, `choose_layers`) and the linear probe's test accuracy per (block, t)."""

    def __init__(self) -> None:
        self.cells: dict[tuple, dict[str, dict]] = defaultdict(lambda: defaultdict(dict))
        self.per_time: dict[tuple, dict[float, dict]] = defaultdict(lambda: defaultdict(dict))
        self.per_time_val: dict[tuple, dict[float, dict]] = defaultdict(lambda: defaultdict(dict))
        self.attention: dict[tuple, dict] = defaultdict(dict)
        self.masking: dict[tuple, dict] = defaultdict(dict)
        self.attention_per_class: dict[tuple, dict] = defaultdict(dict)
        self.cka: dict[tuple, dict] = defaultdict(dict)
        self.times: dict[tuple, list[float]] = {}
        self.convergence: dict[tuple, dict[str, dict]] = defaultdict(lambda: defaultdict(dict))
        self.sde: dict[tuple, dict] = {}  # sigma_min, sigma_max of the row's encoder, where its records say
        self.layer_candidates: dict[tuple, dict[str, dict]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(list)))
        self.chosen: dict[tuple, dict] = defaultdict(dict)  # the MLP's (block, t) per pretraining seed
        self.layer_grid: dict[tuple, dict[tuple[str, float], dict]] = defaultdict(lambda: defaultdict(dict))
        self.blocks: dict[tuple, list[str]] = {}
        self.revisions: Counter = Counter()  # result files per code revision that wrote them

    def add(self, results: dict, path: Path) -> None:
        context, summary = results["context"], results["summary"]
        self.revisions[results["records"][0].get("git_revision") if results["records"] else None] += 1
        probe, seed = probe_label(context), context.get("pretrain_seed")
        for task, selected in summary.items():
            row = self._row(context, task)
            self._add_cell(row, probe, seed, selected, path)
            if "sde" in context:
                self.sde[row] = context["sde"]
            if "linear_cka" in context:
                self.cka[row][seed] = mean_off_diagonal(torch.tensor(context["linear_cka"]))
            if probe == "mlp":
                self._add_per_time(row, seed, selected)
            if probe == "transformer":
                chosen = [r for r in results["records"] if r["task"] == task and r["lr"] == selected["lr"]]
                self._add_attention(row, seed, chosen, context["times"])
            if _of_one_block(context) and probe in KINDS and KINDS[probe].single_time:
                self._add_block_candidate(self._row(context, task, per_layer=False), context, probe, seed, selected)

    @staticmethod
    def _row(context: dict, task: str, per_layer: bool = True) -> tuple:
        # (layer, t) tokens repeat the grid once per block: the row names the grid
        times = sorted(set(context["times"])) if context.get("layer_tokens") else context["times"]
        steps = "-" if context.get("pretrain_steps") is None else context["pretrain_steps"]
        # a denoiser's encoder row spans blocks of several widths; each block's row says its own
        width = context.get("latent_dim") if not context.get("blocks") or (per_layer and _of_one_block(context)) \
            else "-"
        return (context.get("dataset"), encoder_label(context, per_layer), width, steps, grid_label(times), task)

    def _add_cell(self, row: tuple, probe: str, seed, selected: dict, path: Path | str) -> None:
        if seed in self.cells[row][probe]:
            raise TrajrepError(f"{path} repeats {probe} for pretraining seed {seed} of row {row}; remove the "
                               "stale result file")
        self.cells[row][probe][seed] = selected["test_acc_mean"]
        self.convergence[row][probe][seed] = (selected.get("last_epoch_fraction"), bool(selected.get("at_grid_edge")))

    def _add_per_time(self, row: tuple, seed, selected: dict) -> None:
        """The MLP's test and validation accuracy at every t (selected lr per t)."""
        for entry in selected["per_time"]:
            self.per_time[row][entry["time"]][seed] = entry["test_acc_mean"]
            self.per_time_val[row][entry["time"]][seed] = entry["val_acc_mean"]

    def _add_block_candidate(self, row: tuple, context: dict, probe: str, seed, selected: dict) -> None:
        """A block's single-t probe as a candidate of the encoder's row (and, for the linear probe, its accuracy
        at every t, for the (block, t) heat map)."""
        self.layer_candidates[row][probe][seed].append((selected, context["layer"]))
        self.blocks[row] = context.get("blocks") or []
        if "sde" in context:
            self.sde[row] = context["sde"]
        if probe == "linear":
            for entry in selected["per_time"]:
                self.layer_grid[row][(context["layer"], entry["time"])][seed] = entry["test_acc_mean"]

    def choose_layers(self) -> None:
        """Per encoder row, probe and pretraining seed: the block whose probe has the best validation accuracy
        (at its own best t), i.e. the (block, t) chosen on validation; its test accuracy fills the cell."""
        for row, by_probe in self.layer_candidates.items():
            for probe, by_seed in by_probe.items():
                for seed, candidates in by_seed.items():
                    selected, layer = max(candidates, key=lambda candidate: candidate[0]["val_acc_mean"])
                    self._add_cell(row, probe, seed, selected, f"the {probe} records of the blocks of {row[1]}")
                    if probe == "mlp":  # the row's accuracy over t: the chosen block's
                        self.chosen[row][seed] = (layer, selected["time"])
                        self._add_per_time(row, seed, selected)

    def _add_attention(self, row: tuple, seed, chosen: list[dict], times: list[float]) -> None:
        """The selected Transformer members' attention (overall, per class) and masking, mean over probe seeds."""
        if not chosen or "attention" not in chosen[0]:
            return
        self.attention[row][seed] = np.mean([r["attention"] for r in chosen], axis=0).tolist()
        self.times[row] = times
        by_class = [r["attention_per_class"] for r in chosen]
        classes = [c for c, weights in enumerate(by_class[0]) if weights is not None]  # present in the test split
        self.attention_per_class[row][seed] = {"classes": classes, "weights": np.mean(
            [[weights[c] for c in classes] for weights in by_class], axis=0).tolist()}
        masked = [r["masking"] for r in chosen]
        self.masking[row][seed] = {name: np.mean([m[name] for m in masked], axis=0).tolist() for name in masked[0]}


def convergence_warnings(convergence: dict[str, dict]) -> list[str]:
    """Why cells of a row may not be converged results, one phrase per probe: the mean fraction of members that
    peak at their last epoch (over pretraining seeds) when above UNCONVERGED_FRACTION, and in how many seeds the
    selected lr sits at the edge of its grid (for a single-t probe, at the selected t)."""
    found = []
    for probe, by_seed in convergence.items():
        fractions = [f for f, _ in by_seed.values() if f is not None]
        edges = sum(edge for _, edge in by_seed.values())
        reasons = []
        if fractions and np.mean(fractions) > UNCONVERGED_FRACTION:
            reasons.append(f"{100 * np.mean(fractions):.0f} % peak at the last epoch")
        if edges:
            reasons.append(f"lr at the grid's edge in {edges}/{len(by_seed)} seeds")
        if reasons:
            found.append(f"{columns().get(probe, probe)} ({'; '.join(reasons)})")
    return found


def collect(results_dir: str | Path) -> Collected:
    """Every result file under `results_dir` (checked against its checksum)."""
    collected = Collected()
    for path in sorted(Path(results_dir).rglob("*.json")):
        collected.add(read_results(path), path)
    collected.choose_layers()
    return collected


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std (None for a single value)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def difference_interval(mixer: list[float], single: list[float]) -> tuple[float, float | None]:
    """Mean of mixer - best t over paired pretraining seeds and the half-width of its 95 % t-interval."""
    paired = np.array(mixer) - np.array(single)
    if len(paired) < 2:
        return float(paired.mean()), None
    half = stats.t.ppf(0.975, len(paired) - 1) * paired.std(ddof=1) / math.sqrt(len(paired))
    return float(paired.mean()), float(half)


def table_rows(collected: Collected) -> list[dict]:
    """One dict per row: its fields, then per probe (mean, std, seeds) and per mixer (difference, half-width)
    over the pretraining seeds that both the mixer and the MLP have."""
    rows = []
    for row in sorted(collected.cells, key=row_order):
        cells = collected.cells[row]
        entry = dict(zip(ROW_FIELDS, row))
        for probe in columns():
            values = list(cells.get(probe, {}).values())
            entry[probe] = (*mean_std(values), len(values)) if values else None
        cka = list(collected.cka.get(row, {}).values())
        entry["cka"] = float(np.mean(cka)) if cka else None
        for column, baseline, label in differences():
            seeds = sorted(set(cells.get(column, {})) & set(cells.get(baseline, {})), key=str)
            entry[label] = difference_interval([cells[column][s] for s in seeds],
                                               [cells[baseline][s] for s in seeds]) if seeds else None
        entry["chosen"] = chosen_label(collected.chosen.get(row, {}))
        entry["warnings"] = convergence_warnings(collected.convergence.get(row, {}))
        rows.append(entry)
    return rows


def chosen_label(by_seed: dict) -> str:
    """The MLP's (block, t) chosen on validation, the most frequent over pretraining seeds:
    "up.1, t = 0.2 (2/3 seeds)"."""
    if not by_seed:
        return ""
    (layer, time), count = Counter(by_seed.values()).most_common(1)[0]
    return f"{layer}, t = {time:g}" + (f" ({count}/{len(by_seed)} seeds)" if len(by_seed) > 1 else "")


def _cell(value: tuple | None) -> str:
    """mean ± std in percent; a single seed has no spread to show."""
    if value is None:
        return ""
    return f"{100 * value[0]:.2f}" + (f" ± {100 * value[1]:.2f}" if value[2] > 1 else "")


def _difference(value: tuple | None) -> str:
    """mean difference ± 95 % half-width in percent; one seed says it has no interval."""
    if value is None:
        return ""
    return f"{100 * value[0]:+.2f}" + (" (n = 1, no interval)" if value[1] is None else f" ± {100 * value[1]:.2f}")


def _filled(rows: list[dict]) -> tuple[list[str], list[tuple[str, str, str]]]:
    """The probe columns and the differences that some row fills (the tables leave the others out)."""
    return ([probe for probe in columns() if any(row[probe] for row in rows)],
            [difference for difference in differences() if any(row[difference[2]] for row in rows)])


def _text_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the columns some row fills."""
    probes, filled = _filled(rows)
    labels = [label for _, _, label in filled]
    chosen = [CHOSEN] if any(row["chosen"] for row in rows) else []
    header = [*ROW_FIELDS, *chosen, *(columns()[p] for p in probes), *labels, "CKA across t"]
    body = [[str(row[f]) for f in ROW_FIELDS] + [row["chosen"] for _ in chosen] + [_cell(row[p]) for p in probes]
            + [_difference(row[label]) for label in labels]
            + ["" if row["cka"] is None else f"{row['cka']:.3f}"] for row in rows]
    return header, body


def revision_note(revisions: Counter) -> str:
    """Which code wrote the records: one revision, or a warning naming each with its count of result files (a table
    of several revisions mixes code that may have changed between them)."""
    named = {revision or "unknown (not a git checkout)": count for revision, count in revisions.most_common()}
    if not named:
        return "No result files yet."
    if len(named) == 1:
        return f"Every record comes from code revision {next(iter(named))}."
    files = [f"{revision} ({count} result file{'s' if count > 1 else ''})" for revision, count in named.items()]
    return f"Warning: the records come from {len(named)} code revisions: {', '.join(files)}."


def write_tables(rows: list[dict], out: Path, revisions: Counter) -> None:
    """table.md (with the code revision of its records), table.csv (numbers unrounded) and table.tex, each with the
    columns some row fills."""
    header, body = _text_table(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    probes, filled = _filled(rows)
    seeds = sorted({row[p][2] for row in rows for p in probes if row[p]})
    note = (f"Test accuracy (%), mean ± std over pretraining seeds (n = {', '.join(map(str, seeds))}); "
            "differences with a 95 % t-interval over paired seeds. CKA across t: mean linear CKA between the "
            "test representations at every two times of the grid (1 = the same representation at every t).")
    warnings = [f"- {' / '.join(str(row[f]) for f in ROW_FIELDS)}: {', '.join(row['warnings'])}" for row in rows
                if row["warnings"]]
    if warnings:
        lines += ["", "Warning: not converged, so these cells are not yet results (train longer, or widen the lr "
                  "grid):", *warnings]
    (out / "table.md").write_text("\n".join([note, "", revision_note(revisions), "", *lines]) + "\n")
    with open(out / "table.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*ROW_FIELDS, "mlp_layer_t", *(f"{p}_{s}" for p in probes for s in ("mean", "std", "seeds")),
                         *(f"{c}_minus_{b}_{s}" for c, b, _ in filled for s in ("mean", "ci95")), "cka_mean"])
        for row in rows:
            writer.writerow([row[f] for f in ROW_FIELDS] + [row["chosen"]]
                            + ["" if v is None else v for p in probes for v in (row[p] or ("", "", ""))]
                            + ["" if v is None else v for _, _, label in filled for v in (row[label] or ("", ""))]
                            + ["" if row["cka"] is None else row["cka"]])
    escape = str.maketrans({"_": r"\_", "%": r"\%", "±": r"$\pm$"})
    tex = [r"\begin{tabular}{" + "l" * len(ROW_FIELDS) + "r" * (len(header) - len(ROW_FIELDS)) + "}", r"\hline",
           " & ".join(h.translate(escape) for h in header) + r" \\", r"\hline"]
    tex += [" & ".join(c.translate(escape) for c in cells) + r" \\" for cells in body]
    (out / "table.tex").write_text("\n".join([*tex, r"\hline", r"\end{tabular}"]) + "\n")


TIME_LABEL = "t (0 = clean, 1 = most noise)"


def time_axes(ax: plt.Axes, sde: dict | None) -> None:
    """t along the bottom and, where the records name the noise process, sigma(t) along the top at the same
    positions (sigma grows geometrically in t, so the top ticks are labelled, not spaced, by sigma)."""
    ax.set_xlabel(TIME_LABEL)
    if sde is None:
        return
    ticks = [0.0, 0.25, 0.5, 0.75, 1.0]
    sigmas = VESDE(sde["sigma_min"], sde["sigma_max"]).sigma(torch.tensor(ticks, dtype=torch.float64)).tolist()
    top = ax.secondary_xaxis("top")
    top.set_xticks(ticks, labels=[f"{sigma:.2g}" for sigma in sigmas], fontsize=7)
    top.set_xlabel("noise scale sigma(t)", fontsize=8)


def panel_title(row: tuple) -> str:
    """Two short lines for a figure panel: dataset and encoder, then latent size, steps, grid (and task)."""
    dataset, encoder, latent_dim, steps, grid, *task = row
    times = f"g = {grid}" if isinstance(grid, int) else grid
    return f"{dataset}: {encoder}\nd_z = {latent_dim}, {steps} steps, {times}" + "".join(f", {t}" for t in task)


def shared_legend(figure: plt.Figure, axes: list[plt.Axes], title: str) -> None:
    """One legend for every panel, below them, so that none covers data; then the final layout."""
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    figure.tight_layout(rect=(0, 0.8 / figure.get_figheight(), 1, 1))  # 0.8 inch for the legend
    figure.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(handles), 6), fontsize=8,
                  title=title, title_fontsize=8)


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
        references = [column for column in (*mixer_columns(), "concat", "transformer-replicated")
                      if collected.cells[row].get(column)]
        for column, colour in zip(references, plt.get_cmap("tab10").colors):
            ax.axhline(100 * np.mean(list(collected.cells[row][column].values())), color=colour, ls="--",
                       label=columns()[column])
        ax.set_ylabel("test accuracy (%)")
        ax.ticklabel_format(axis="y", useOffset=False)  # 99.99 %, not 0.00 + 9.999e1
        time_axes(ax, collected.sde.get(row))
        ax.set_title(panel_title(row), fontsize=9)
    shared_legend(figure, axes, "MLP at each t (band: ± std over pretraining seeds); dashed: probes over all t")
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_linear_over_layers(collected: Collected, path: Path) -> None:
    """Denoiser features: the linear probe's test accuracy at every (block, t), mean over pretraining seeds, one
    heat map per encoder row (blocks in the order the backbone computes them)."""
    keys = sorted(collected.layer_grid, key=row_order)
    if not keys:
        return
    figure, axes = panels(keys)
    for ax, row in zip(axes, keys):
        grid = collected.layer_grid[row]
        layers = [b for b in collected.blocks[row] if any(layer == b for layer, _ in grid)]
        layers += sorted({layer for layer, _ in grid} - set(layers))
        times = sorted({time for _, time in grid})
        accuracy = 100 * np.array([[np.mean(list(grid[(layer, time)].values())) if (layer, time) in grid else np.nan
                                    for time in times] for layer in layers])
        image = ax.imshow(accuracy, aspect="auto", cmap="viridis")
        for (i, j), value in np.ndenumerate(accuracy):
            if not np.isnan(value):
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if value < np.nanmean(accuracy) else "black")
        ax.set_xticks(range(len(times)), labels=[f"{time:g}" for time in times], fontsize=7)
        ax.set_yticks(range(len(layers)), labels=layers, fontsize=7)
        ax.set_xlabel(TIME_LABEL)
        ax.set_ylabel("block")
        figure.colorbar(image, ax=ax, label="linear test accuracy (%)")
        ax.set_title(panel_title(row), fontsize=9)
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
        ax.set_ylabel("CLS attention (± std over seeds)")
        time_axes(ax, collected.sde.get(row))
        ax.set_title(panel_title(row), fontsize=9)
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
    figures = [out / f"{name}.png" for name in ("accuracy_vs_t", "attention_over_t", "linear_over_layers")
               if (out / f"{name}.png").exists()]
    log_wandb_run(logged, figures, project, group, "report", run_dir)


def report(results_dir: str | Path, out: str | Path | None = None, wandb_project: str | None = None,
           wandb_group: str | None = None, wandb_dir: str | Path = "runs") -> Path:
    """Write table.md/csv/tex and the figures for every result file under `results_dir`; returns the out folder."""
    out = Path(out or results_dir)
    out.mkdir(parents=True, exist_ok=True)
    collected = collect(results_dir)
    rows = table_rows(collected)
    write_tables(rows, out, collected.revisions)
    plot_accuracy_vs_t(collected, out / "accuracy_vs_t.png")
    plot_attention_over_t(collected, out / "attention_over_t.png")
    plot_linear_over_layers(collected, out / "linear_over_layers.png")
    if wandb_project:
        log_to_wandb(rows, collected, out, wandb_project, wandb_group or out.name, Path(wandb_dir))
    return out


def main(args: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(prog=prog, description="Build the results table and figures from probe result "
                                     "files.")
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
