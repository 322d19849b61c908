"""Regime search: many pretraining runs, each watched by the online trajectory probe, in one table and figure.

    python -m trajrep.regime configs/regime/fashion.yaml      -> results/regime/<sweep>/table.md, online.png

Which settings make the encoder (a) a real representation and (b) depend on t? Answering with the whole pipeline
costs an extraction and dozens of probe grids per setting; the OnlineProbe callback (a ridge probe per t, CKA between
the first and last t) answers it from the pretraining run itself. A sweep file (the `Sweep` fields) names a
pretraining config, options for every run and the runs (a name and their own options). Every run resumes from its
last checkpoint and is skipped once it finished, so a sweep longer than a sitting continues where it stopped and a
new run added to the file trains only that run. Two references, measured by the same probe on the same images:
raw pixels and the untrained encoder with calibrated BatchNorm (the random-features control).
"""

import argparse
import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)
import yaml  # noqa: E402
from jsonargparse import ArgumentParser  # noqa: E402

from trajrep.lightning_cli import build_cli, run as cli_main, summarise_parser_error  # noqa: E402
from trajrep.errors import TrajrepError, errors_as_one_line  # noqa: E402
from trajrep.nn.encoder import stage_widths  # noqa: E402
from trajrep.pretrain.online_probe import OnlineProbe, split_accuracy_name  # noqa: E402
from trajrep.pretrain.module import calibrate_untrained  # noqa: E402


@dataclass
class SweepRun:
    """One pretraining setting: a name for its folder and row, and the CLI options that make it."""

    name: str
    args: list[str] = field(default_factory=list)


@dataclass
class Sweep:
    """What a sweep file holds: the pretraining config, options for every run (before each run's own), the runs
    and the seed of all of them (also the untrained reference's)."""

    pretrain_config: str
    runs: list[SweepRun]
    args: list[str] = field(default_factory=list)
    seed: int = 0


def load_sweep(path: str | Path) -> Sweep:
    """Parse and check a sweep file (unknown keys and repeated run names fail here)."""
    path = Path(path)
    if not path.is_file():
        raise TrajrepError(f"sweep file {path} not found; the sweeps are in configs/regime/")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Sweep, nested_key="sweep")
    try:
        config = parser.parse_object({"sweep": yaml.safe_load(path.read_text())})
    except Exception as error:
        raise TrajrepError(f"sweep {path} is not valid: {summarise_parser_error(str(error))}") from None
    sweep = parser.instantiate(config).sweep
    names = [run.name for run in sweep.runs]
    if len(set(names)) != len(names):
        raise TrajrepError(f"sweep {path}: run names must differ, got {names}")
    return sweep


def online_rows(run_dir: Path) -> list[dict[str, float]]:
    """The online probe's logged rows of a run (every resumed version in order), as floats, by step."""
    rows = {}
    for metrics in sorted(run_dir.glob("lightning_logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:])):
        with metrics.open() as file:
            for row in csv.DictReader(file):
                online = {key: float(value) for key, value in row.items() if key.startswith("online/") and value}
                if online:
                    rows[int(row["step"])] = {"step": int(row["step"]), **online}
    return [rows[step] for step in sorted(rows)]


def run_settings(run_dir: Path) -> dict:
    """Mode, latent size, regulariser weight, lr, batch size and data of a run, from the config LightningCLI saved."""
    saved = sorted(run_dir.glob("lightning_logs/version_*/config.yaml"), key=lambda p: int(p.parent.name[8:]))
    config = yaml.safe_load(saved[-1].read_text())
    model, data = config["model"]["init_args"], config["data"]
    return {"mode": model["mode"], "widen_factor": model["widen_factor"],
            "latent_dim": stage_widths(model["widen_factor"], model.get("latent_dim"))[-1],
            "reg_weight": model["reg_weight"], "lr": model["lr"], "batch_size": data["init_args"]["batch_size"],
            "data": data["class_path"].rsplit(".", 1)[-1], "precision": config["trainer"]["precision"]}


def final_numbers(logged: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per task, the held-out accuracy at every t of a run's last logged probe: {task: {t name: accuracy}}, the
    times in increasing order (the CSV log sorts its columns as text)."""
    tasks: dict[str, dict[str, float]] = {}
    for key, value in logged[-1].items():
        if key.startswith("online/acc_"):
            task, time_label = split_accuracy_name(key)
            tasks.setdefault(task, {})[time_label] = value
    return {task: dict(sorted(by_time.items(), key=lambda item: float(item[0][1:])))
            for task, by_time in tasks.items()}


def cka_of(point: dict[str, float]) -> float:
    """CKA(first t, last t) of one logged probe."""
    return next(value for key, value in point.items() if key.startswith("online/cka_"))


def best_per_task(point: dict[str, float]) -> dict[str, float]:
    """Per task, the accuracy at its best t in one logged probe."""
    best: dict[str, float] = {}
    for key, value in point.items():
        if key.startswith("online/acc_"):
            task = split_accuracy_name(key)[0]
            best[task] = max(best.get(task, 0.0), value)
    return best


class RegimeSweep:
    """The runs of one sweep file and their summary; each run trains, resumes or is skipped.

    A run is skipped when it finished here (its DONE file) or when the committed results/<sweep>/runs.json
    records it as finished and it did not finish here (a fresh clone, whose runs/ git does not hold): its row is
    then read from there, so a sweep's table outlives the checkpoints. Delete a run's row there to retrain it.
    """

    def __init__(self, sweep: Sweep, name: str, runs: Path, results: Path) -> None:
        self.sweep, self.name = sweep, name
        self.runs, self.results = runs / name, results / name
        recorded = self.results / "runs.json"
        self.recorded = {row["name"]: row for row in json.loads(recorded.read_text())["runs"]} \
            if recorded.exists() else {}

    def _args(self, run: SweepRun, run_dir: Path) -> list[str]:
        # The checkpoint folder right after the config, while ModelCheckpoint is still the last callback there.
        return ["--config", self.sweep.pretrain_config, "--trainer.callbacks.init_args.dirpath",
                str(run_dir / "checkpoints"), *self.sweep.args, *run.args, f"--seed_everything={self.sweep.seed}",
                f"--trainer.default_root_dir={run_dir}"]

    def _recorded_only(self, run: SweepRun) -> bool:
        """Whether the run finished in another checkout (its row in runs.json) and not here."""
        return self.recorded.get(run.name, {}).get("finished", False) and not (self.runs / run.name / "DONE").exists()

    def train(self, run: SweepRun) -> None:
        """Fit (or resume) one run unless it finished, here or in the checkout that wrote runs.json; the seconds of
        every fit call add up in wall.json (a killed call's seconds are not counted)."""
        run_dir = self.runs / run.name
        if (run_dir / "DONE").exists():
            return
        if self._recorded_only(run):
            print(f"trajrep regime: {run.name} finished in an earlier checkout ({self.results / 'runs.json'}); "
                  "delete its row there to train it again", flush=True)
            return
        last = run_dir / "checkpoints" / "last.ckpt"
        print(f"trajrep regime: {'resuming' if last.exists() else 'training'} {run.name}", flush=True)
        start = time.perf_counter()
        cli_main(["fit", *self._args(run, run_dir), *(["--ckpt_path", str(last)] if last.exists() else [])])
        wall = run_dir / "wall.json"
        before = json.loads(wall.read_text())["seconds"] if wall.exists() else 0.0
        wall.write_text(json.dumps({"seconds": before + time.perf_counter() - start}) + "\n")
        (run_dir / "DONE").write_text("fit returned\n")

    def _online_probe(self, run: SweepRun) -> tuple[OnlineProbe, object]:
        """A run's OnlineProbe and its LightningCLI, built (not trained) from the run's options."""
        cli = build_cli(self._args(run, self.runs / run.name / "untrained"), run=False)
        probes = [callback for callback in cli.trainer.callbacks if isinstance(callback, OnlineProbe)]
        if not probes:
            raise TrajrepError(f"{self.sweep.pretrain_config} has no OnlineProbe callback; the sweep reads its "
                               "numbers (add it to trainer.callbacks)")
        cli.datamodule.setup("fit")
        return probes[0], cli

    def untrained_accuracy(self, run: SweepRun) -> dict[str, float]:
        """Per task, the best-t online accuracy of the run's architecture untrained, BatchNorm calibrated (the
        random-features control), on the probe's images; kept in the run's untrained.json."""
        path = self.runs / run.name / "untrained.json"
        if not path.exists():
            probe, cli = self._online_probe(run)
            calibrate_untrained(cli.model, cli.datamodule, self.sweep.seed)
            metrics = probe.measure(cli.model, cli.datamodule)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"best": best_per_task(metrics), **metrics}, indent=1) + "\n")
        return json.loads(path.read_text())["best"]

    def pixel_accuracy(self, components: int | None = None) -> dict[str, float]:
        """Per task, the same probe on raw pixels of the first run's data, or on their top `components`
        principal components; kept in pixels.json."""
        path = self.runs / "pixels.json"
        known = json.loads(path.read_text()) if path.exists() else {}
        key = "accuracy" if components is None else f"pca{components}"
        if key not in known:
            probe, cli = self._online_probe(self.sweep.runs[0])
            known[key] = probe.pixel_accuracy(cli.datamodule, components)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(known, indent=1) + "\n")
        return known[key]

    def summary(self) -> list[dict]:
        """One row per run that logged an online probe (here, or recorded in runs.json by another checkout):
        its settings, steps, wall time, CKA and, per task, its final accuracy per t against the references."""
        rows = []
        for run in self.sweep.runs:
            if self._recorded_only(run):
                rows.append(self.recorded[run.name])
                continue
            run_dir = self.runs / run.name
            logged = online_rows(run_dir)
            if not logged:
                continue
            final = logged[-1]
            settings = run_settings(run_dir)
            untrained, pixels = self.untrained_accuracy(run), self.pixel_accuracy()
            pixel_pca = self.pixel_accuracy(settings["latent_dim"])
            tasks, numbers = {}, final_numbers(logged)
            for task, accuracy in ((task, numbers[task]) for task in untrained):  # the data's order of tasks
                best_t = max(accuracy, key=accuracy.get)
                tasks[task] = {"accuracy": accuracy, "best": accuracy[best_t], "best_t": best_t,
                               "spread": accuracy[best_t] - min(accuracy.values()), "untrained": untrained[task],
                               "pixels": pixels[task], "pixel_pca": pixel_pca[task]}
            wall = run_dir / "wall.json"
            rows.append({"name": run.name, **settings, "steps": final["step"], "finished": (run_dir / "DONE").exists(),
                         "wall_minutes": json.loads(wall.read_text())["seconds"] / 60 if wall.exists() else None,
                         "tasks": tasks, "cka": cka_of(final),
                         "between_image_fraction": final["online/between_image_fraction"], "curve": logged})
        return rows

    def run(self) -> Path:
        for run in self.sweep.runs:
            self.train(run)
        return self.write()

    def write(self) -> Path:
        """table.md, runs.json and online.png under results/<sweep>/, from what the runs logged so far and the
        rows kept from runs.json."""
        rows = self.summary()
        self.results.mkdir(parents=True, exist_ok=True)
        (self.results / "runs.json").write_text(json.dumps({"runs": rows}, indent=1) + "\n")
        times = list(next(iter(rows[0]["tasks"].values()))["accuracy"]) if rows else []
        header = ["run", "mode", "encoder width k", "d_z", "reg weight", "lr", "batch", "data", "steps", "wall (min)",
                  "task", *(f"acc {t} (%)" for t in times), "best t", "best - worst t", "pixels (%)", "untrained (%)",
                  "best - untrained", "best - pixels", "pixels PCA-d_z (%)", "best - PCA-d_z", "CKA(first t, last t)"]
        lines = [f"Online ridge probe (held-out accuracy per task and t; {self.sweep.pretrain_config}) at each run's "
                 "last logged step, one line per task; on the same images, the same probe reads raw pixels ('pixels'), "
                 "their top d_z principal components (the linear code of the latent's size that best reconstructs "
                 "them: 'pixels PCA-d_z') and each run's architecture untrained, BatchNorm calibrated ('untrained'). "
                 "Runs marked * have not finished.", "",
                 "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in rows:
            wall = "-" if row["wall_minutes"] is None else f"{row['wall_minutes']:.0f}"
            run_cells = [row["name"] + ("" if row["finished"] else " *"), row["mode"], f"{row['widen_factor']:g}",
                         row["latent_dim"], f"{row['reg_weight']:g}", f"{row['lr']:g}", row["batch_size"],
                         row["data"], row["steps"], wall]
            for task, numbers in row["tasks"].items():
                cells = [*run_cells, task, *(f"{100 * numbers['accuracy'][t]:.1f}" for t in times),
                         numbers["best_t"], f"{100 * numbers['spread']:.1f}", f"{100 * numbers['pixels']:.1f}",
                         f"{100 * numbers['untrained']:.1f}", f"{100 * (numbers['best'] - numbers['untrained']):+.1f}",
                         f"{100 * (numbers['best'] - numbers['pixels']):+.1f}", f"{100 * numbers['pixel_pca']:.1f}",
                         f"{100 * (numbers['best'] - numbers['pixel_pca']):+.1f}", f"{row['cka']:.3f}"]
                lines.append("| " + " | ".join(map(str, cells)) + " |")
        (self.results / "table.md").write_text("\n".join(lines) + "\n")
        plot_online_curves(rows, self.results / "online.png")
        return self.results / "table.md"


def plot_online_curves(rows: list[dict], path: Path) -> None:
    """Per task, best-t online accuracy over pretraining steps, one line per run (its untrained architecture
    dotted, raw pixels dashed), and CKA(first t, last t) over steps."""
    if not rows:
        return
    tasks = list(rows[0]["tasks"])
    columns = min(len(tasks) + 1, 3)
    lines = math.ceil((len(tasks) + 1) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(5.5 * columns, 4.2 * lines + 1), squeeze=False)
    *accuracy_axes, cka = axes.flat[:len(tasks) + 1]
    for unused in axes.flat[len(tasks) + 1:]:
        unused.set_visible(False)
    colours = plt.get_cmap("tab20")(range(len(rows)))
    for row, colour in zip(rows, colours):
        steps = [point["step"] for point in row["curve"]]
        best = [best_per_task(point) for point in row["curve"]]
        for task, axis in zip(tasks, accuracy_axes):
            axis.plot(steps, [100 * b[task] for b in best], "o-", color=colour, label=row["name"], markersize=3)
            axis.axhline(100 * row["tasks"][task]["untrained"], color=colour, ls=":", lw=1)
        cka.plot(steps, [cka_of(point) for point in row["curve"]], "o-", color=colour, markersize=3)
    for task, axis in zip(tasks, accuracy_axes):
        axis.axhline(100 * rows[0]["tasks"][task]["pixels"], color="black", ls="--", label="raw pixels")
        axis.set(xlabel="pretraining step", ylabel=f"held-out {task} accuracy at the best t (%)",
                 title=f"Is it a representation? ({task}, online ridge probe)")
    accuracy_axes[0].plot([], [], color="grey", ls=":", lw=1, label="dotted: the run's encoder untrained (calibrated)")
    cka.set(xlabel="pretraining step", ylabel="linear CKA(E(x, first t), E(x, last t))",
            title="Does it depend on t? (1 = the same at every t)")
    cka.set_ylim(min(0.0, *(math.floor(10 * cka_of(p)) / 10 for r in rows for p in r["curve"])), 1.02)
    figure.tight_layout(rect=(0, 0.9 / (4.2 * lines + 1), 1, 1))
    handles, labels = accuracy_axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a regime sweep's pretraining runs (skipping finished ones) "
                                                 "and tabulate their online probes.")
    parser.add_argument("sweep", help="a sweep file, e.g. configs/regime/fashion.yaml")
    parser.add_argument("--runs", default="runs/regime", help="checkpoints and logs (default: runs/regime)")
    parser.add_argument("--results", default="results/regime", help="table and figure (default: results/regime)")
    parser.add_argument("--summary-only", action="store_true", help="tabulate what the runs logged so far, train "
                        "nothing (e.g. while a sweep runs)")
    options = parser.parse_args(args)
    with errors_as_one_line():
        sweep = load_sweep(options.sweep)
        regime = RegimeSweep(sweep, Path(options.sweep).stem, Path(options.runs), Path(options.results))
        out = regime.write() if options.summary_only else regime.run()
    print(f"trajrep regime: {out}")


if __name__ == "__main__":
    main()
