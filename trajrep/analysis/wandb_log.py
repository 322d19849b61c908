"""The report's and the analyses' tables, line plots and figures in a W&B run (offline works without an account)."""

from pathlib import Path

import numpy as np

from trajrep.analysis.collect import Collected, encoder_title, row_order
from trajrep.analysis.tables import text_table


def log_wandb_run(logged: dict, figures: list[Path], project: str, group: str, job_type: str,
                  run_dir: Path) -> None:
    """One W&B run named `job_type`-`group`: the `logged` tables and plots, and the `figures` as images."""
    import wandb

    run_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, group=group, job_type=job_type, dir=str(run_dir), name=f"{job_type}-{group}")
    run.log({**logged, **{path.stem: wandb.Image(str(path)) for path in figures}})
    run.finish()


def log_report(rows: list[dict], collected: Collected, out: Path, project: str, group: str,
               run_dir: Path) -> None:
    """The results table and the accuracy-vs-t line plot as W&B tables, the figures as images (one run)."""
    import wandb

    header, body = text_table(rows)
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


def log_analysis(accuracy: dict, attention: dict, figures: list[Path], project: str, group: str,
                 run_dir: Path) -> None:
    """Accuracy and attention over t as W&B tables with line plots (one line per encoder and task) and the
    figures as images, in one run."""
    import wandb

    logged = {}
    for name, by_encoder, key, scale, title in (
            ("accuracy_over_t", accuracy, "test_", 100, "MLP test accuracy (%) over t"),
            ("attention_per_task", attention, "", 1, "Transformer CLS attention over t")):
        table = wandb.Table(columns=["series", "t", "mean", "std"], data=[
            [f"{encoder_title(encoder)} / {task}", t, scale * mean, scale * std]
            for encoder, tasks in sorted(by_encoder.items(), key=lambda item: row_order(item[0]))
            for task, entry in sorted(tasks.items())
            for t, mean, std in zip(entry["times"], entry[f"{key}mean"], entry[f"{key}std"])])
        logged[f"{name}_table"] = table
        logged[f"{name}_lines"] = wandb.plot.line(table, "t", "mean", stroke="series", title=title)
    log_wandb_run(logged, figures, project, group, "analysis", run_dir)
