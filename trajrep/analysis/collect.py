"""Probe result files collected into table rows.

A row is one (dataset, encoder, d_z, pretraining steps, grid granularity g, task); an encoder is its variant name
(else its pretraining mode), prefixed with "untrained" for the randomly initialised control (0 pretraining steps),
or "pixels" for the raw-pixel control.
A cell is the mean ± std over pretraining seeds of the probe's selected test accuracy (for `mlp`, at the best
single t chosen on validation).
Denoiser features have a row per block ("encoder @ block", the single-t probes of that block) and a row of the
encoder without a block: there the single-t probes are at the (block, t) best on validation, as DDAE picks them
by hand, the mixers at the block the MLP chose, and the Transformer over (layer, t) reads every block at every t.
"probe - best t" (each probe over t: the mixers, concat, mean, weighted) is the mean difference over pretraining seeds
with a 95 % t-interval (none with one seed).
"CKA across t" is the mean linear CKA between the representations at two different times (trajrep.similarity).
"""

import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from trajrep.errors import TrajrepError
from trajrep.probe.kinds import KINDS
from trajrep.probe.records import probe_label, read_results
from trajrep.probe.selection import best_block
from trajrep.similarity import mean_off_diagonal
from trajrep.timegrid import grid_label


def base_kind(column: str) -> str:
    """The probe kind of a column: "transformer" for "transformer-replicated" and "transformer-layers"."""
    return column.removesuffix("-replicated").removesuffix("-layers")


def columns() -> dict[str, str]:
    """Every column a table can have, with its label: each probe kind (trajrep.probe.kinds, in its order), then
    each kind over every t with its best single t replicated at every position, then each over (layer, t)
    tokens."""
    kinds = {name: kind.column for name, kind in KINDS.items()}
    over_t = [name for name, kind in KINDS.items() if not kind.single_time]
    return {**kinds, **{f"{name}-replicated": f"{kinds[name]}, best t replicated" for name in over_t},
            **{f"{name}-layers": f"{kinds[name]} over (layer, t)" for name in over_t}}


def mixer_columns() -> list[str]:
    """The columns of mixers (over t or over (layer, t)), each compared to the best single t."""
    return [column for column in columns() if KINDS[base_kind(column)].mixer and "-replicated" not in column]


def differences() -> list[tuple[str, str, str]]:
    """(column, baseline, label) of each difference the table reports with a 95 % interval over paired pretraining
    seeds: every probe over t minus the best single t (the mixers first, then the pooling heads such as concat,
    the capacity references), then every kind minus its replicated best t (mixers first)."""
    labels = columns()
    pooled = [name for name, kind in KINDS.items() if not kind.single_time and not kind.mixer]
    replicated = sorted((column for column in labels if column.endswith("-replicated")),
                        key=lambda column: not KINDS[base_kind(column)].mixer)
    return [*((column, "mlp", f"{labels[column]} - best t") for column in [*mixer_columns(), *pooled]),
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


def encoder_title(encoder: tuple) -> str:
    """An encoder (and task) on one line, for tables."""
    return " / ".join(str(value) for value in encoder)


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
        # the MLP's selected t per (row, block of denoiser features or None) and pretraining seed; the replicated
        # controls' (t, block) per row, probe and seed
        self.best_time: dict[tuple, dict] = defaultdict(dict)
        self.replicated_time: dict[tuple, dict[str, dict]] = defaultdict(lambda: defaultdict(dict))
        self.left_out: dict[tuple, Counter] = defaultdict(Counter)  # replicated cells of another task's best t
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
                self.best_time[(self._row(context, task, per_layer=False), context.get("layer"))][seed] = \
                    selected.get("time")
                self._add_per_time(row, seed, selected)
            if context.get("replicated_time") is not None:
                self.replicated_time[row][probe][seed] = (context["replicated_time"], context.get("layer"))
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
                    by_layer = {layer: selected for selected, layer in candidates}
                    layer = best_block({layer: selected["val_acc_mean"] for layer, selected in by_layer.items()},
                                       self.blocks[row])
                    selected = by_layer[layer]
                    self._add_cell(row, probe, seed, selected, f"the {probe} records of the blocks of {row[1]}")
                    if probe == "mlp":  # the row's accuracy over t: the chosen block's
                        self.chosen[row][seed] = (layer, selected["time"])
                        self._add_per_time(row, seed, selected)

    def drop_other_tasks_replicas(self) -> None:
        """A replicated control repeats one task's best t (a preset's, the first task's) for every task of the
        data; on a task whose own best t (the MLP's, same pretraining seed and block) is another, it is no capacity
        control of that task's best t, so its cell is left out (and counted in `left_out`)."""
        for row, by_probe in self.replicated_time.items():
            for probe, by_seed in by_probe.items():
                for seed, (time, layer) in by_seed.items():
                    best = self.best_time.get((row, layer), {}).get(seed)
                    if best is not None and not math.isclose(best, time, abs_tol=1e-9):
                        del self.cells[row][probe][seed]
                        del self.convergence[row][probe][seed]
                        self.left_out[row][probe] += 1
                if not self.cells[row][probe]:
                    del self.cells[row][probe], self.convergence[row][probe]

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
    collected.drop_other_tasks_replicas()
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
        entry["left_out"] = dict(collected.left_out.get(row, {}))
        rows.append(entry)
    return rows


def chosen_label(by_seed: dict) -> str:
    """The MLP's (block, t) chosen on validation, the most frequent over pretraining seeds:
    "up.1, t = 0.2 (2/3 seeds)"."""
    if not by_seed:
        return ""
    (layer, time), count = Counter(by_seed.values()).most_common(1)[0]
    return f"{layer}, t = {time:g}" + (f" ({count}/{len(by_seed)} seeds)" if len(by_seed) > 1 else "")
