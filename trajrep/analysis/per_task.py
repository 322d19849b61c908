"""What each point of the trajectory knows, per task, from probe result files alone (method §9).

    trajrep analyse results/<preset>/probes [--out results/<preset>/analysis] [--wandb-project P]

For every encoder (a report row without its task):
- accuracy over t per task: the single-t MLP's validation and test accuracy at every t (selected lr per t),
  mean ± std over pretraining seeds -> accuracy_over_t.json, accuracy_over_t.png (one panel per encoder, one line
  per task);
- attention over t per task: the Transformer's CLS attention over the time tokens (averaged over heads, test
  examples and probe seeds at the selected lr, renormalised over the time tokens), mean ± std over pretraining
  seeds -> attention_per_task.json, attention_per_task.png; and per class of each task -> attention_per_class.json,
  attention_per_class.png (a heat map per encoder and task);
- task profiles: the Jensen-Shannon divergence (bits) between the tasks' mean attention profiles ->
  task_divergence.json, task_divergence.png;
- masking ablation: the Transformer's test accuracy with one key hidden from attention (each time token, or the
  CLS key) and with only one time token left -> masking.json, masking.md, masking.png (bars: accuracy change);
- mutual information between times: MINE estimates of I(E(x, t_i); E(x, t_j)) on the test representations of
  every cache a single-t MLP read, NMI_ij = I_ij / sqrt(I_ii I_jj), mean over estimator and pretraining seeds
  -> nmi.json, nmi.png (11 x 11 for g = 10);
- analysis.md: per task, the val-selected best t, the accuracy at the cleanest and noisiest t, and the t that
  receives the most attention.
Attention and masking come from the very Transformer members whose accuracy the report shows: each at its best
validation epoch, at the selected learning rate. With a W&B project, accuracy and attention over t per task are
also logged as tables with line plots, and every figure as an image, in one run.
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from scipy.spatial.distance import jensenshannon

from trajrep.analysis.collect import Collected, collect, encoder_label, encoder_title, mean_std, row_order
from trajrep.analysis.mi import time_nmi
from trajrep.analysis.plots import plot_attention_per_class, plot_heat_maps, plot_masking, plot_per_task
from trajrep.analysis.wandb_log import log_analysis
from trajrep.checks import ensure_wandb_ready
from trajrep.data.cache import RepresentationCache
from trajrep.errors import TrajrepError, errors_as_one_line
from trajrep.probe.records import read_results
from trajrep.timegrid import grid_label, select_times


def _encoder(row: tuple) -> tuple:
    return row[:-1]


def accuracy_over_t(collected: Collected) -> dict[tuple, dict[str, dict]]:
    """{encoder: {task: {"times", "test_mean", "test_std", "val_mean", "val_std"}}} (accuracies in [0, 1])."""
    found: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for row, by_time in collected.per_time.items():
        if len(by_time) < 2:
            continue  # the pixel control has one "time"
        times = sorted(by_time)
        entry = {"times": times}
        for split, source in (("test", collected.per_time), ("val", collected.per_time_val)):
            stats = [mean_std(list(source[row][t].values())) for t in times]
            entry[f"{split}_mean"] = [mean for mean, _ in stats]
            entry[f"{split}_std"] = [std or 0.0 for _, std in stats]
        found[_encoder(row)][row[-1]] = entry
    return found


def attention_per_task(collected: Collected) -> dict[tuple, dict[str, dict]]:
    """{encoder: {task: {"times", "mean", "std", "seeds"}}}: attention over the time tokens, summing to 1."""
    found: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for row, by_seed in collected.attention.items():
        weights = np.array(list(by_seed.values()))[:, :-1]  # drop the weight on the CLS key itself
        weights = weights / weights.sum(axis=1, keepdims=True)
        found[_encoder(row)][row[-1]] = {
            "times": collected.times[row], "mean": weights.mean(axis=0).tolist(),
            "std": (weights.std(axis=0, ddof=1) if len(weights) > 1 else np.zeros(weights.shape[1])).tolist(),
            "seeds": len(weights)}
    return found


def attention_per_class(collected: Collected) -> dict[tuple, dict[str, dict]]:
    """{encoder: {task: {"times", "classes", "mean" (classes x times), "seeds"}}}: the attention over the time
    tokens per class of the task, renormalised over the time tokens, mean over pretraining seeds."""
    found: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for row, by_seed in collected.attention_per_class.items():
        entries = list(by_seed.values())
        weights = np.mean([entry["weights"] for entry in entries], axis=0)[:, :-1]
        found[_encoder(row)][row[-1]] = {
            "times": collected.times[row], "classes": entries[0]["classes"],
            "mean": (weights / weights.sum(axis=1, keepdims=True)).tolist(), "seeds": len(entries)}
    return found


def masking_ablation(collected: Collected) -> dict[tuple, dict[str, dict]]:
    """{encoder: {task: {"times", "full", "drop", "keep_only"}}}: the Transformer's test accuracy with nothing
    hidden, with one key hidden (time tokens, then the CLS key) and with one time token kept, mean over
    pretraining seeds (selected lr, mean over probe seeds)."""
    found: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for row, by_seed in collected.masking.items():
        seeds = list(by_seed.values())
        found[_encoder(row)][row[-1]] = {"times": collected.times[row], **{
            name: np.mean([seed[name] for seed in seeds], axis=0).tolist() for name in seeds[0]}}
    return found


def nmi_between_times(results_dir: str | Path, seeds: list[int], max_examples: int, **mine_options
                      ) -> dict[tuple, dict]:
    """{encoder: {"times", "nmi" (T x T, mean over pretraining seeds), "seeds"}} from the test representations of
    every cache that a single-t MLP grid read (its result file names the cache). MINE runs on a GPU if there is
    one."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    by_encoder: dict[tuple, dict] = defaultdict(lambda: {"nmi": []})
    for path in sorted(Path(results_dir).rglob("mlp-*.json")):
        context = read_results(path)["context"]
        if "cache_key" not in context or context.get("encoder_mode") == "pixels":
            continue
        cache = RepresentationCache(Path(context["config"]["data"]["cache_dir"]) / context["cache_key"])
        indices = select_times(cache.times, context["times"])
        test = cache.representations("test", indices, context.get("layer"))[:max_examples]  # denoiser: its block
        test = torch.from_numpy(test).float().to(device)
        encoder = (context.get("dataset"), encoder_label(context), context.get("latent_dim"),
                   context.get("pretrain_steps"), grid_label(context["times"]))
        by_encoder[encoder]["times"] = context["times"]
        by_encoder[encoder]["nmi"].append(time_nmi(test, seeds, progress=True, **mine_options))
    return {encoder: {"times": entry["times"], "nmi": torch.stack(entry["nmi"]).mean(dim=0).tolist(),
                      "seeds": len(entry["nmi"])} for encoder, entry in by_encoder.items()}


def js_divergence_bits(p: list[float], q: list[float]) -> float:
    """Jensen-Shannon divergence in bits (scipy gives the distance, its square root)."""
    return float(jensenshannon(p, q, base=2) ** 2)


def task_divergence(attention: dict[tuple, dict[str, dict]]) -> dict[tuple, dict]:
    """{encoder: {"tasks", "bits" (tasks x tasks)}} between the mean attention profiles, for encoders probed on
    two tasks or more (one task has nothing to differ from)."""
    found = {}
    for encoder, by_task in attention.items():
        tasks = sorted(by_task)
        if len(tasks) < 2:
            continue
        found[encoder] = {"tasks": tasks, "bits": [[js_divergence_bits(by_task[a]["mean"], by_task[b]["mean"])
                                                    for b in tasks] for a in tasks]}
    return found


def masking_markdown(masking: dict) -> str:
    """Per encoder and task: accuracy with nothing hidden, the key whose loss hurts most, the best single kept t."""
    lines = ["| encoder | task | all keys | worst key hidden | accuracy then | best kept t | accuracy then |",
             "|---|---|---|---|---|---|---|"]
    for encoder in sorted(masking, key=row_order):
        for task, entry in sorted(masking[encoder].items()):
            names = [f"t={t:g}" for t in entry["times"]] + ["CLS"]
            worst, best = int(np.argmin(entry["drop"])), int(np.argmax(entry["keep_only"]))
            lines.append(f"| {encoder_title(encoder)} | {task} | {100 * entry['full'][0]:.2f} | {names[worst]} | "
                         f"{100 * entry['drop'][worst]:.2f} | {entry['times'][best]:g} | "
                         f"{100 * entry['keep_only'][best]:.2f} |")
    return "\n".join(lines) + "\n"


def summary_markdown(accuracy: dict, attention: dict) -> str:
    """Per encoder and task: best t on validation, test accuracy at the cleanest and noisiest t, peak attention."""
    lines = ["| encoder | task | best t (val) | test acc at best t | at t = first | at t = last | most attended t |",
             "|---|---|---|---|---|---|---|"]
    for encoder in sorted(accuracy, key=row_order):
        for task, entry in sorted(accuracy[encoder].items()):
            best = int(np.argmax(entry["val_mean"]))
            seen = attention.get(encoder, {}).get(task)
            peak = f"{seen['times'][int(np.argmax(seen['mean']))]:g}" if seen else ""
            lines.append(f"| {encoder_title(encoder)} | {task} | {entry['times'][best]:g} | "
                         f"{100 * entry['test_mean'][best]:.2f} | {100 * entry['test_mean'][0]:.2f} | "
                         f"{100 * entry['test_mean'][-1]:.2f} | {peak} |")
    return "\n".join(lines) + "\n"


def _keyed(by_encoder: dict) -> list[dict]:
    """JSON has no tuple keys: one object per encoder, its row fields named."""
    return [{"encoder": list(encoder), **value} for encoder, value in sorted(by_encoder.items(),
                                                                             key=lambda item: row_order(item[0]))]


def analyse(results_dir: str | Path, out: str | Path, mine_steps: int = 4000, mine_seeds: list[int] = [0, 1],
            mine_examples: int = 5000, wandb_project: str | None = None,
            wandb_group: str | None = None, wandb_dir: str | Path = "runs") -> Path:
    """Write every analysis file for the result files under `results_dir` into `out` (the NMI heat maps only
    with mine_steps > 0: 4,000 MINE steps for every pair of times take about 15 minutes per cache and seed on 2
    CPU cores)."""
    collected = collect(results_dir)
    accuracy, attention = accuracy_over_t(collected), attention_per_task(collected)
    if not accuracy:
        raise TrajrepError(f"no single-t MLP results under {results_dir}; run the mlp probe (or the preset) first")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    divergence, masking = task_divergence(attention), masking_ablation(collected)
    per_class = attention_per_class(collected)
    for name, value in (("accuracy_over_t", accuracy), ("attention_per_task", attention),
                        ("attention_per_class", per_class), ("task_divergence", divergence), ("masking", masking)):
        (out / f"{name}.json").write_text(json.dumps(_keyed(value), indent=1, allow_nan=False))
    written: list[Path] = []  # this run's figures (not older ones in `out`), for W&B

    def figure(name: str) -> Path:
        written.append(out / f"{name}.png")
        return written[-1]

    plot_per_task(accuracy, figure("accuracy_over_t"), "test_", "MLP test accuracy (%)", scale=100)
    if attention:
        plot_per_task(attention, figure("attention_per_task"), "", "CLS attention (share of time tokens)")
    if divergence:
        plot_heat_maps(divergence, figure("task_divergence"), "tasks", "bits", "JS divergence (bits)")
    if per_class:
        plot_attention_per_class(per_class, figure("attention_per_class"))
    if masking:
        plot_masking(masking, figure("masking"))
        (out / "masking.md").write_text(masking_markdown(masking))
    if mine_steps > 0:
        nmi = nmi_between_times(results_dir, mine_seeds, mine_examples, steps=mine_steps)
        (out / "nmi.json").write_text(json.dumps(_keyed(nmi), indent=1, allow_nan=False))
        plot_heat_maps(nmi, figure("nmi"), "times", "nmi", "NMI")
    (out / "analysis.md").write_text(summary_markdown(accuracy, attention))
    if wandb_project:
        log_analysis(accuracy, attention, written, wandb_project, wandb_group or out.parent.name, Path(wandb_dir))
    return out


def main(args: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(prog=prog, description="Per-task accuracy and attention over t from probe "
                                     "results.")
    parser.add_argument("results_dir", help="a folder of probe result files, e.g. results/<preset>/probes")
    parser.add_argument("--out", default=None, help="output folder (default: <results_dir>/../analysis)")
    parser.add_argument("--mine-steps", type=int, default=4000, help="MINE steps per pair of times (0: no NMI)")
    parser.add_argument("--mine-seeds", type=int, nargs="+", default=[0, 1], help="MINE estimator seeds")
    parser.add_argument("--mine-examples", type=int, default=5000, help="test examples given to MINE")
    parser.add_argument("--wandb-project", default=None, help="also log tables, line plots and figures to W&B")
    parser.add_argument("--wandb-group", default=None, help="W&B group (default: the preset, out's parent folder)")
    parser.add_argument("--wandb-dir", default="runs", help="where the W&B run folder goes (not under results/)")
    options = parser.parse_args(args)
    with errors_as_one_line():
        if options.wandb_project:
            ensure_wandb_ready()
        out = analyse(options.results_dir, options.out or Path(options.results_dir).parent / "analysis",
                      options.mine_steps, options.mine_seeds, options.mine_examples,
                      options.wandb_project, options.wandb_group, options.wandb_dir)
    print(out / "analysis.md")


if __name__ == "__main__":
    main()
