"""`trajrep report RESULTS_DIR [--out DIR] [--wandb-project P --wandb-group G]`: the paper-style table and figures,
built from probe result files alone (trajrep.analysis.collect says what a row and a cell are)."""

import argparse
from pathlib import Path

from trajrep.analysis.collect import collect, table_rows
from trajrep.analysis.plots import plot_accuracy_vs_t, plot_attention_over_t, plot_linear_over_layers
from trajrep.analysis.tables import write_tables
from trajrep.analysis.wandb_log import log_report
from trajrep.checks import ensure_wandb_ready
from trajrep.errors import errors_as_one_line


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
        log_report(rows, collected, out, wandb_project, wandb_group or out.name, Path(wandb_dir))
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
