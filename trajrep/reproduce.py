"""The whole experiment for a preset: pretrain -> cache -> probe grids -> report, resumable stage by stage.

    python -m trajrep.reproduce configs/presets/smoke.yaml      (make reproduce-table PRESET=smoke)
    trajrep reproduce configs/presets/paper.yaml --launcher slurm  (each stage a job: trajrep.launch)

A preset (configs/presets/*.yaml, the `Preset` fields) names the datasets (each with its pretraining config and
the images its probes read), the encoder variants, the pretraining seeds, the time grids and the probe kinds.
The preset becomes a graph of stages (`Reproduction.stages`), and a stage is skipped when its output exists and is
valid, so a killed run picks up where it stopped:
- a pretraining run is done once `fit` returned (a DONE marker); otherwise it resumes from its last checkpoint,
  unless results/ holds records of the run (its checkpoint gone, say): then nothing starts, since new weights would
  not match them, and the message says which folders to remove to redo the run;
- caches are content-addressed (RepresentationDataModule reuses a valid one);
- a probe grid is done when its result file exists and passes its checksum; a killed one resumes from the
  checkpoint of its last epoch;
- a pretraining run whose probes are all done is not needed again: a fresh clone, which has the committed records
  but no checkpoints, goes on from the first run with a missing record.
Two controls come with every preset: the same probes on an untrained encoder of each variant, and the MLP on raw
pixels. Outputs: runs/<preset>/ (checkpoints, logs; not in git), results/<preset>/ (records, tables, figures).
"""

import argparse
import contextlib
import io
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
from jsonargparse import ArgumentParser

import trajrep.data
from trajrep.checks import ensure_wandb_ready, ensure_writable
from trajrep.lightning_cli import build_cli, run as cli_main, summarise_parser_error
from trajrep.errors import TrajrepError, errors_as_one_line
from trajrep.launch import (LAUNCHERS, Resources, Stage, check_launch, print_graph, print_status, resources_for,
                            run_inline, run_local, submit_slurm)
from trajrep.pretrain.module import calibrate_untrained, randomize_untrained_score_net
from trajrep.analysis.report import report
from trajrep.probe.kinds import KINDS, kind_of, single_time_kinds
from trajrep.probe.records import read_results, settings_digest
from trajrep.probe.selection import best_block
from trajrep.threads import available_cpus
from trajrep.timegrid import granularity_times

CONFIGS = Path(__file__).resolve().parent / "configs"  # package data; configs/ in a checkout links to it
# A mixer of denoiser features reads the block whose MLP has the best validation accuracy.
CHOSEN_BLOCK = "chosen-block"


@dataclass
class Encoder:
    """One pretraining variant: a name for its runs and the CLI options that make it (mode, widths, ...).

    `seeds` overrides the preset's pretraining seeds; `probe_steps` also probes the checkpoints saved at these
    steps (to follow the representation through training; ModelCheckpoint must save at them); `untrained` adds
    the randomly initialised control of this variant. `cache` options go over the preset's: `source: denoiser`
    with `blocks` probes the score network's blocks at x_t instead of the encoder. Then the single-t probes run on
    every block (the table picks the (block, t) best on validation), the other kinds on the block whose MLP
    validates best, and `layer_tokens` kinds again over every (block, t) as tokens.
    """

    name: str
    args: list[str] = field(default_factory=list)
    seeds: list[int] | None = None
    probe_steps: list[int] = field(default_factory=list)
    untrained: bool = True
    cache: dict = field(default_factory=dict)
    layer_tokens: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Probing:
    """One probe grid of a run: `kind` on grid `grid`, recorded in the run's folder `where` (g10, g10/<block>,
    g10/chosen-block, ...), reading one block (`block`; CHOSEN_BLOCK: the one whose MLP validates best) or every
    block as tokens, or the MLP's best t at every position (`replicated`); `needs` are the folders of the MLP
    records it reads."""

    grid: int
    where: str
    kind: str
    block: str | None = None
    tokens: bool = False
    replicated: bool = False
    needs: tuple[str, ...] = ()


@dataclass
class Dataset:
    """One dataset of a preset: a name for its runs, the pretraining config, and the images its probes read (an
    image datamodule class and its arguments). Its `pretrain_args` and `probe_args` follow the preset's own (e.g.
    more probe epochs for a small set)."""

    name: str
    pretrain_config: str
    images: str
    images_args: dict = field(default_factory=dict)
    pretrain_args: list[str] = field(default_factory=list)
    probe_args: list[str] = field(default_factory=list)

    @property
    def images_config(self) -> dict:
        return {"class_path": self.images, "init_args": self.images_args}


@dataclass
class Preset:
    """What a preset file holds. `probe_args` go to every probe run, `probe_kind_args[kind]` to that kind's only
    (e.g. head sizes), `pixel_probe_args[kind]` last to the raw-pixel control's probe of that kind (pixels are far
    wider than a latent, so their lr grid sits elsewhere). `replicated` kinds (mixers) run again on the MLP's best
    single t repeated at every position: their capacity control (for multi-task data, the best t of the first task).
    `threads` is every stage's torch CPU threads (default: the CPUs available to the process; with the local
    launcher, their share of them). `resources[kind]` is what a stage of that kind (pretrain, untrained, cache,
    probe, report) asks a SLURM cluster for; unset fields keep trajrep's defaults (trajrep.launch)."""

    datasets: list[Dataset]
    encoders: list[Encoder]
    seeds: list[int] = field(default_factory=lambda: [0])
    pretrain_args: list[str] = field(default_factory=list)
    grids: list[int] = field(default_factory=lambda: [10])
    cache: dict = field(default_factory=dict)
    probes: list[str] = field(default_factory=lambda: list(KINDS))  # every registered kind
    probe_args: list[str] = field(default_factory=list)
    probe_kind_args: dict[str, list[str]] = field(default_factory=dict)
    pixel_probe_args: dict[str, list[str]] = field(default_factory=dict)
    replicated: list[str] = field(default_factory=list)
    wandb_project: str | None = None
    threads: int | None = None
    resources: dict[str, Resources] = field(default_factory=dict)


def load_preset(path: str | Path, check: bool = True) -> Preset:
    """Parse a preset file (unknown or mistyped keys fail here, with the key named) and, with `check`, check it."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Preset, nested_key="preset")
    try:
        config = parser.parse_object({"preset": _read_yaml(path)})
    except Exception as error:  # jsonargparse reports which key is wrong
        raise TrajrepError(f"preset {path} is not valid: {summarise_parser_error(str(error))}") from None
    preset = parser.instantiate(config).preset
    if check:
        check_preset(preset, f"preset {path}")
    return preset


def check_preset(preset: Preset, where: str) -> None:
    """Everything a preset names, checked before its first stage runs: head kinds, the kinds its per-kind options
    are for, unique names, config files, image classes, and every encoder's pretraining options (parsed, not run)."""
    unknown = [kind for kind in [*preset.probes, *preset.replicated] if kind not in KINDS]
    if unknown:
        raise TrajrepError(f"{where}: unknown probe kind(s) {', '.join(map(repr, unknown))}; valid kinds: "
                           f"{', '.join(sorted(KINDS))}")
    if preset.replicated and "mlp" not in preset.probes:
        raise TrajrepError(f"{where}: the replicated controls ({', '.join(preset.replicated)}) run on the mlp "
                           "probe's best single t; add mlp to probes")
    for key, allowed in (("probe_kind_args", preset.probes),
                         ("pixel_probe_args", [k for k in single_time_kinds() if k in preset.probes])):
        stray = [kind for kind in getattr(preset, key) if kind not in allowed]
        if stray:
            raise TrajrepError(f"{where}: {key} has options for {', '.join(map(repr, stray))}, which the preset does "
                               f"not run (its kinds here: {', '.join(allowed)}); fix the key or add the kind")
    for encoder in preset.encoders:
        _check_blocks(preset, encoder, f"{where}: encoder {encoder.name}")
    for what, names in (("dataset", [d.name for d in preset.datasets]), ("encoder", [e.name for e in preset.encoders])):
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise TrajrepError(f"{where}: {what} names must differ (their runs and rows are named by them); "
                               f"repeated: {', '.join(repeated)}")
    for dataset in preset.datasets:
        config = _in_repository(dataset.pretrain_config)
        if not config.is_file():
            raise TrajrepError(f"{where}: dataset {dataset.name}'s pretrain_config {dataset.pretrain_config} is not a "
                               "file")
        if "." not in dataset.images and not isinstance(getattr(trajrep.data, dataset.images, None), type):
            raise TrajrepError(f"{where}: dataset {dataset.name}'s images {dataset.images!r} is not a trajrep image "
                               f"datamodule ({', '.join(trajrep.data.__all__)}) or a full import path")
        for encoder in preset.encoders:
            _check_parses(["fit", "--config", str(config), *preset.pretrain_args, *dataset.pretrain_args,
                           *encoder.args], f"{where}: dataset {dataset.name}, encoder {encoder.name}")


def _cache_options(preset: Preset, encoder: Encoder) -> dict:
    return {**preset.cache, **encoder.cache}


def _blocks(preset: Preset, encoder: Encoder) -> list[str] | None:
    """The denoiser blocks an encoder variant's probes read (None: its encoder's representations)."""
    options = _cache_options(preset, encoder)
    return list(options.get("blocks") or []) if options.get("source") == "denoiser" else None


def _check_blocks(preset: Preset, encoder: Encoder, where: str) -> None:
    """A variant that reads denoiser blocks names some, has the MLP that chooses its mixers' block, and reads
    (layer, t) tokens only with the Transformer (the one head that tells tokens apart by position alone)."""
    blocks = _blocks(preset, encoder)
    if blocks is None:
        if encoder.layer_tokens or _cache_options(preset, encoder).get("blocks"):
            raise TrajrepError(f"{where}: blocks and layer_tokens are for denoiser features; add source: denoiser "
                               "to its cache options")
        return
    if not blocks:
        raise TrajrepError(f"{where}: source: denoiser needs blocks (`trajrep extract --list_layers true` lists "
                           "them)")
    if "mlp" not in preset.probes:
        raise TrajrepError(f"{where} reads denoiser blocks, and its mixers read the block the mlp probe validates "
                           "best on; add mlp to probes")
    stray = [kind for kind in encoder.layer_tokens if kind != "transformer" or kind not in preset.probes]
    if stray:
        raise TrajrepError(f"{where}: layer_tokens {', '.join(stray)}: only the transformer reads (layer, t) "
                           "tokens, and only as a kind the preset probes")


def _check_parses(args: list[str], where: str) -> None:
    """The CLI parses `args` (printing the config, quietly; nothing is built)."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            build_cli([*args, "--print_config"])
    except SystemExit as done:
        if done.code not in (0, None):
            raise TrajrepError(f"{where}: the options do not parse") from None
    except TrajrepError as error:
        raise TrajrepError(f"{where}: {error}") from None


def _read_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in (CONFIGS / "presets").glob("*.yaml")))
        raise TrajrepError(f"preset file {path} not found; give a preset file or the name of one that trajrep ships "
                           f"({shipped})")
    return yaml.safe_load(path.read_text())


def _in_repository(path: str) -> Path:
    """A relative config path from the current folder, or else from the trajrep package ("configs/..." names its
    package data, as the shipped presets do)."""
    here = Path(path)
    return here if here.is_absolute() or here.exists() else CONFIGS.parent / path


def preset_path(preset: str) -> Path:
    """A preset file, or the name of one that trajrep ships: `trajrep reproduce smoke`."""
    path = Path(preset)
    shipped = CONFIGS / "presets" / f"{preset}.yaml"
    return shipped if not path.exists() and not path.suffix and shipped.is_file() else path


def _is_valid_record(path: Path, block: str | None = None) -> bool:
    """Whether a result file reads, passes its checksum and (given `block`) read that denoiser block, leaving it in
    place either way."""
    try:
        context = read_results(path)["context"]
    except TrajrepError:
        return False
    return block is None or context.get("layer") == block


class Reproduction:
    """The stages of one preset; each method does its stage or skips it."""

    def __init__(self, preset: Preset, name: str, runs: Path, results: Path) -> None:
        self.preset, self.name = preset, name
        self.runs, self.results = runs / name, results / name

    def _logger_args(self, run: str, stage: str, run_dir: Path) -> list[str]:
        """W&B for one stage, its folder (and the run's config.yaml) inside that stage's own run folder."""
        if not self.preset.wandb_project:
            return []
        return ["--trainer.logger=WandbLogger", f"--trainer.logger.project={self.preset.wandb_project}",
                f"--trainer.logger.group={self.name}", f"--trainer.logger.name={stage}-{run}",
                f"--trainer.logger.save_dir={run_dir}"]

    def _run_stage(self, subcommand: str, args: list[str]) -> None:
        """One `trajrep fit` (or validate), then close its W&B run: Lightning leaves it open, and the next stage
        would reuse it."""
        cli_main([subcommand, *args, *self._threads])
        if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
            sys.modules["wandb"].finish()

    @property
    def _threads(self) -> list[str]:
        return [] if self.preset.threads is None else [f"--threads={self.preset.threads}"]

    def _pretrain_args(self, dataset: Dataset, encoder: Encoder, seed: int, run_dir: Path) -> list[str]:
        return ["--config", str(_in_repository(dataset.pretrain_config)), *self.preset.pretrain_args,
                *dataset.pretrain_args, *encoder.args, f"--seed_everything={seed}",
                f"--trainer.default_root_dir={run_dir}",
                "--trainer.callbacks.init_args.dirpath", str(run_dir / "checkpoints")]

    def pretrain(self, dataset: Dataset, encoder: Encoder, seed: int) -> Path:
        """Train (or resume, or skip) one encoder variant at one seed; returns its final checkpoint."""
        run = f"{dataset.name}-{encoder.name}-seed{seed}"
        run_dir, done = self.runs / run, self.runs / run / "DONE"
        last = run_dir / "checkpoints" / "last.ckpt"
        if done.exists() and last.exists():
            return last
        self.refuse_losing_records(run)
        # Killed probe grids of earlier weights: their checkpoints must not be resumed on the new representations.
        for folder in self._run_folders(self.runs / "probe", run):
            shutil.rmtree(folder)
        resume = ["--ckpt_path", str(last)] if last.exists() else []
        self._run_stage("fit", [*self._pretrain_args(dataset, encoder, seed, run_dir),
                                *self._logger_args(run, "pretrain", run_dir), *resume])
        done.write_text("fit returned\n")
        return last

    @staticmethod
    def _run_folders(root: Path, run: str) -> list[Path]:
        """A run's folders under `root`: its own and those of its `probe_steps` checkpoints."""
        return [folder for folder in [root / run, *root.glob(f"{run}-step*")] if folder.exists()]

    def refuse_losing_records(self, run: str) -> None:
        """Stop before pretraining `run` again while results/ holds its records (a fresh clone of a preset that
        gained a probe kind, or a deleted checkpoint): the new weights would not be the ones they read, and a row
        mixes no two encoders. Removing them here would silently throw away hours of committed probes."""
        counts = {folder: len(list(folder.rglob("*.json")))
                  for folder in self._run_folders(self.results / "probes", run)}
        records = [folder for folder, count in counts.items() if count]
        if not records:
            return
        last = self.runs / run / "checkpoints" / "last.ckpt"
        why = (f"its checkpoint {last} is missing" if not last.exists()
               else f"its pretraining did not finish (no {self.runs / run / 'DONE'})")
        count, folders = sum(counts.values()), " ".join(map(str, records))
        raise TrajrepError(f"{run} would be pretrained again, as a probe it needs is not recorded and {why}; but "
                           f"results hold {count} probe records of it, which new weights would not match. To redo the "
                           f"run, remove them (rm -r {folders}); to keep them, restore the run's checkpoint folder "
                           "and DONE, or drop the missing probes from the preset")

    def check_no_records_lost(self, stages: list[Stage]) -> None:
        """Before any stage starts: `refuse_losing_records` for every run the stages would pretrain."""
        for stage in stages:
            if stage.kind == "pretrain" and not stage.done():
                self.refuse_losing_records(stage.name.split("/", 1)[1])

    @staticmethod
    def at_step(last: Path, step: int) -> Path:
        """The checkpoint ModelCheckpoint saved at `step` next to `last`."""
        found = sorted(last.parent.glob(f"*step={step}.ckpt"))
        if not found:
            raise TrajrepError(f"no checkpoint of step {step} in {last.parent}; probe_steps must be steps at which "
                               "ModelCheckpoint saves (a multiple of its every_n_train_steps)")
        return found[-1]

    def stages(self) -> list[Stage]:
        """The preset as a graph of stages, each after what it needs, in the order the inline launcher runs them:
        each run's cache and probes before the next run pretrains (a sitting that ends mid-preset leaves records,
        not only checkpoints), the raw-pixel control after a dataset's runs, the report last."""
        graph: list[Stage] = []
        for dataset in self.preset.datasets:
            for encoder in self.preset.encoders:
                for seed in encoder.seeds or self.preset.seeds:
                    graph += self._trained_stages(dataset, encoder, seed)
                if encoder.untrained:
                    graph += self._untrained_stages(dataset, encoder)
            for kind in single_time_kinds():  # the raw-pixel control, through the same protocol
                if kind in self.preset.probes:
                    run = f"{dataset.name}-pixels"
                    graph.append(Stage(f"probe/{run}/{kind}", [],
                                       partial(_has_record, self.results / "probes" / run, kind),
                                       partial(self.probe, run, kind, dataset, ["--data=PixelProbeData"],
                                               extra=self.preset.pixel_probe_args.get(kind, []))))
        # The report is always made again: it is quick, and it reads every record, figure code included.
        graph.append(Stage("report", [stage.name for stage in graph], lambda: False, self.report))
        return graph

    def _trained_stages(self, dataset: Dataset, encoder: Encoder, seed: int) -> list[Stage]:
        """One pretraining run, then for its final checkpoint (and each of its `probe_steps`) a cache and probes.
        A run whose every probe is recorded under results/ needs no pretraining, checkpoint or not (a fresh
        clone: git holds the records, not the checkpoints)."""
        run = f"{dataset.name}-{encoder.name}-seed{seed}"
        last = self.runs / run / "checkpoints" / "last.ckpt"
        probed = {run: partial(Path, last),
                  **{f"{run}-step{step}": partial(self.at_step, last, step) for step in encoder.probe_steps}}
        pretrain = Stage(f"pretrain/{run}", [], partial(self._pretrained, run, list(probed), encoder),
                         partial(self.pretrain, dataset, encoder, seed))
        return [pretrain, *(stage for name, checkpoint in probed.items()
                            for stage in self._probe_stages(name, dataset, encoder, checkpoint, pretrain.name))]

    def _pretrained(self, run: str, probed: list[str], encoder: Encoder) -> bool:
        finished = (self.runs / run / "DONE").exists() and (self.runs / run / "checkpoints" / "last.ckpt").exists()
        return finished or all(self._recorded(name, encoder) for name in probed)

    def _untrained_stages(self, dataset: Dataset, encoder: Encoder) -> list[Stage]:
        run = f"{dataset.name}-{encoder.name}-untrained"
        checkpoint = self.runs / run / "untrained.ckpt"
        build = Stage(f"untrained/{run}", [], lambda: checkpoint.exists() or self._recorded(run, encoder),
                      partial(self.untrained, dataset, encoder))
        return [build, *self._probe_stages(run, dataset, encoder, partial(Path, checkpoint), build.name)]

    def _probe_stages(self, run: str, dataset: Dataset, encoder: Encoder, checkpoint: Callable[[], Path],
                      after: str) -> list[Stage]:
        """A checkpoint's cache (all the preset's grids), then its probings (`probings`). `checkpoint` gives its
        path once `after` ran."""
        cache = Stage(f"cache/{run}", [after], partial(self._recorded, run, encoder),
                      lambda: self.build_cache(dataset, encoder, checkpoint()))
        stages = [cache]
        for probing in self.probings(encoder):
            folder = self.results / "probes" / run / probing.where
            stages.append(Stage(f"probe/{run}/{probing.where}/{probing.kind}",
                                [cache.name, *(f"probe/{run}/{need}/mlp" for need in probing.needs)],
                                partial(self._chosen_block_recorded, run, probing, folder)
                                if probing.block == CHOSEN_BLOCK else partial(_has_record, folder, probing.kind),
                                partial(self.probe_grid, run, probing, dataset, encoder, checkpoint)))
        return stages

    def probings(self, encoder: Encoder) -> list[Probing]:
        """Every probe grid of one checkpoint of `encoder`, per grid: each kind, then the replicated-best-t controls
        (which read the MLP's best t). Of denoiser blocks: the single-t kinds on every block, the others on the
        block whose MLP validates best, and the replicated and `layer_tokens` kinds after them."""
        blocks, found = _blocks(self.preset, encoder), []
        for grid in self.preset.grids:
            base = f"g{grid}"
            if blocks is None:
                found += [Probing(grid, base, kind) for kind in self.preset.probes]
                found += [Probing(grid, f"{base}/replicated", kind, replicated=True, needs=(base,))
                          for kind in self.preset.replicated]
                continue
            mlps = tuple(f"{base}/{block}" for block in blocks)
            found += [Probing(grid, f"{base}/{block}", kind, block)
                      for block in blocks for kind in self.preset.probes if kind_of(kind).single_time]
            found += [Probing(grid, f"{base}/{CHOSEN_BLOCK}", kind, CHOSEN_BLOCK, needs=mlps)
                      for kind in self.preset.probes if not kind_of(kind).single_time]
            found += [Probing(grid, f"{base}/{CHOSEN_BLOCK}/replicated", kind, CHOSEN_BLOCK, replicated=True,
                              needs=mlps) for kind in self.preset.replicated]
            found += [Probing(grid, f"{base}/layers", kind, tokens=True) for kind in encoder.layer_tokens]
        return found

    def _recorded(self, run: str, encoder: Encoder) -> bool:
        """Whether results/ holds a valid record of every probing of one run. Only reads: an invalid record counts
        as missing and is left for `probe` to redo."""
        return all(_has_record(self.results / "probes" / run / probing.where, probing.kind)
                   for probing in self.probings(encoder))

    def untrained(self, dataset: Dataset, encoder: Encoder) -> Path:
        """A checkpoint of the variant's randomly initialised model (0 steps), the random-features control: its
        encoder's BatchNorm statistics calibrated on training images at random t, or for a score-only model every
        layer of its score net random."""
        seed = (encoder.seeds or self.preset.seeds)[0]
        path = self.runs / f"{dataset.name}-{encoder.name}-untrained" / "untrained.ckpt"
        if path.exists():
            return path
        pl.seed_everything(seed)
        cli = build_cli([*self._pretrain_args(dataset, encoder, seed, path.parent), *self._threads], run=False)
        if cli.model.encoder is None:  # a plain diffusion model: its denoiser's features are read
            control = {"untrained_init": randomize_untrained_score_net(cli.model)}
        else:
            control = {"batchnorm_calibration": calibrate_untrained(cli.model, cli.datamodule, seed)}
        path.parent.mkdir(parents=True, exist_ok=True)
        unfinished = path.with_suffix(".partial")
        torch.save({"state_dict": cli.model.state_dict(), "hyper_parameters": dict(cli.model.hparams),
                    "global_step": 0, "pretrain_seed": seed, **control}, unfinished)
        unfinished.replace(path)
        return path

    def _probe_done(self, folder: Path, kind: str, block: str | None = None) -> Path | None:
        """The valid result file of `kind` in `folder`, if there is one. An invalid one is removed, and so is one
        that read another block than `block`: the MLP that chooses the block was probed again since, and chose
        another."""
        for path in folder.glob(f"{kind}-*.json"):
            try:
                read = read_results(path)["context"].get("layer")
            except TrajrepError as error:
                print(f"trajrep: redoing {kind} in {folder}: {error}")
                path.unlink()
                continue
            if block is None or read == block:
                return path
            print(f"trajrep: redoing {kind} in {folder}: it read block {read}, and block {block} is chosen now")
            path.unlink()
        return None

    def probe(self, run: str, kind: str, dataset: Dataset, data: list[str], encoder: str | None = None,
              extra: list[str] = (), block: str | None = None) -> Path:
        """One probe kind's grid on one run's representations (or pixels; `block`: the denoiser block it reads),
        unless its results exist; returns its result file. The kNN probe has no training: it runs as `validate`,
        with the probe options of no kind."""
        folder = self.results / "probes" / run
        done = self._probe_done(folder, kind, block)
        if done is not None:
            return done
        run_dir = self.runs / "probe" / run / kind
        name = [f"--model.encoder_name={encoder}"] if encoder else []
        trains = kind_of(kind).head is not None
        training = [*self.preset.probe_args, *dataset.probe_args] if trains else []
        config = kind_of(kind).config  # a registered head may start from another kind's config, with its own options
        head = [f"--model.head={kind_of(kind).options_path()}"] if trains else []
        args = ["--config", str(CONFIGS / "probe" / f"{config}.yaml"), *head,
                *data, f"--data.images={json.dumps(dataset.images_config)}", f"--data.dataset_name={dataset.name}",
                f"--model.results_dir={folder}",
                f"--trainer.default_root_dir={run_dir}", *name, *training, *self.preset.probe_kind_args.get(kind, []),
                *extra, *self._logger_args(run.replace("/", "-"), kind, run_dir)]
        if not trains:
            self._run_stage("validate", args)
            return self._probe_done(folder, kind, block)
        # A checkpoint every epoch, in a folder of these settings: a killed grid resumes (as a straight one would go
        # on), and one of other settings never does, nor keeps its folder. last.ckpt is a file, not a link: Lightning
        # removes the epoch's file before it moves a link, and a kill between the two would lose the grid.
        checkpoints = run_dir / "checkpoints" / settings_digest({"args": args})
        for other in run_dir.glob("checkpoints/*"):
            if other != checkpoints:
                shutil.rmtree(other) if other.is_dir() else other.unlink()
        last = checkpoints / "last.ckpt"
        resume = [f"--ckpt_path={last}"] if last.exists() else []
        self._run_stage("fit", [*args, "--trainer.enable_checkpointing=true", "--trainer.callbacks+=ModelCheckpoint",
                                f"--trainer.callbacks.dirpath={checkpoints}", "--trainer.callbacks.save_last=true",
                                "--trainer.callbacks.save_top_k=1", *resume])
        done = self._probe_done(folder, kind, block)
        if done is not None:  # the record holds what the checkpoint was kept for
            shutil.rmtree(checkpoints)
        return done

    def probe_grid(self, run: str, probing: Probing, dataset: Dataset, encoder: Encoder,
                   checkpoint: Callable[[], Path]) -> Path:
        """One probing of a run's checkpoint (for replicated controls of multi-task data, the best t of the first
        task)."""
        data = self._representation_data(checkpoint(), probing.grid, encoder)
        block = probing.block
        if block == CHOSEN_BLOCK:
            block = self.chosen_block(run, probing)
            data.append(f"--data.layer_selection=the best validation accuracy of the mlp probe over "
                        f"{len(probing.needs)} blocks")
        if block is not None:
            data.append(f"--data.layer={block}")
        if probing.tokens:  # the report reads no attention over (layer, t): its masking passes are left out
            data += ["--data.layer_tokens=true", "--model.export_attention=false"]
        if probing.replicated:
            where = f"g{probing.grid}" if block is None else f"g{probing.grid}/{block}"
            best_t = next(iter(read_results(self._mlp_record(run, where, probing))["summary"].values()))["time"]
            data.append(f"--data.replicate_time={best_t}")
        return self.probe(f"{run}/{probing.where}", probing.kind, dataset, data, encoder.name, block=block)

    def _mlp_record(self, run: str, where: str, probing: Probing) -> Path:
        found = self._probe_done(self.results / "probes" / run / where, "mlp")
        if found is None:
            raise TrajrepError(f"the {probing.kind} probe of {run} ({probing.where}) reads the mlp probe's record in "
                               f"{where}, and there is no valid one; run the mlp probe first")
        return found

    def _chosen_block_recorded(self, run: str, probing: Probing, folder: Path) -> bool:
        """Whether `folder` holds a valid record of the block the MLPs choose now (not done while an MLP record is
        missing, or when they were probed again and chose another block)."""
        if not all(_has_record(self.results / "probes" / run / where, "mlp") for where in probing.needs):
            return False
        return _has_record(folder, probing.kind, self.chosen_block(run, probing))

    def chosen_block(self, run: str, probing: Probing) -> str:
        """The block whose MLP has the best validation accuracy (at its best t, mean over tasks: the mixers read
        one block for every task, where the report's single-t cells take each task's own best block)."""
        val_acc = {}
        for where in probing.needs:
            summary = read_results(self._mlp_record(run, where, probing))["summary"]
            accuracies = [selected["val_acc_mean"] for selected in summary.values()]
            val_acc[where.rsplit("/", 1)[1]] = sum(accuracies) / len(accuracies)
        return best_block(val_acc, list(val_acc))

    def build_cache(self, dataset: Dataset, encoder: Encoder, checkpoint: Path) -> None:
        """The representation cache of a checkpoint on all the preset's grids, which its probes then only read
        (so they may run at once). Built as a probe command builds a missing cache, from the data options every
        probe kind reads it with (a cache's key leaves out the head and the training options)."""
        args = ["--config", str(CONFIGS / "probe" / "linear.yaml"),
                *self._representation_data(checkpoint, self.preset.grids[0], encoder),
                f"--data.images={json.dumps(dataset.images_config)}", f"--trainer.default_root_dir={self.runs}",
                "--trainer.devices=1", *self._threads]  # one process: an inline preset is no DDP launch
        build_cli(args, run=False)

    def _representation_data(self, checkpoint: Path, grid: int, encoder: Encoder) -> list[str]:
        """Probe data for one grid, read from the cache of all the preset's grids (shared points extracted once)."""
        probe_times = [float(t) for t in granularity_times(grid)]
        return ["--data=RepresentationDataModule", f"--data.checkpoint={checkpoint}",
                f"--data.granularities={json.dumps(self.preset.grids)}",
                f"--data.probe_times={json.dumps(probe_times)}",
                *(f"--data.{key}={value if isinstance(value, str) else json.dumps(value)}"  # no quotes around text
                  for key, value in _cache_options(self.preset, encoder).items())]

    def report(self) -> Path:
        return report(self.results / "probes", self.results, self.preset.wandb_project, self.name,
                      wandb_dir=self.runs)

    def stage(self, name: str) -> Stage:
        """The stage of this name (what a job runs)."""
        found = [stage for stage in self.stages() if stage.name == name]
        if not found:
            raise TrajrepError(f"preset {self.name} has no stage {name!r}; see them with --dry-run")
        return found[0]


def _has_record(folder: Path, kind: str, block: str | None = None) -> bool:
    """Whether `folder` holds a valid result file of `kind` (of `block`, given one; only reads)."""
    return any(_is_valid_record(path, block) for path in folder.glob(f"{kind}-*.json"))


def run_stage(preset: Preset, name: str, runs: str, results: str, stage: str) -> None:
    """One stage in a job of its own (what the local and SLURM launchers submit): the preset as the launcher read
    and checked it (a job queued for days does not pick up later edits of the file), the stage's done check made
    again, then its work."""
    found = Reproduction(preset, name, Path(runs), Path(results)).stage(stage)
    if not found.done():
        found.work()


def main(args: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(prog=prog, description="Run a preset's pipeline, skipping finished stages.")
    parser.add_argument("preset", help="a preset file, e.g. configs/presets/smoke.yaml, or the name of a preset "
                        "trajrep ships (smoke, cpu, comparison, ...)")
    parser.add_argument("--runs", default="runs", help="checkpoints and logs (default: runs)")
    parser.add_argument("--results", default="results", help="records, tables and figures (default: results)")
    parser.add_argument("--wandb-project", default=None, help="log every stage to this W&B project (overrides the "
                        "preset's); WANDB_MODE=offline works without an account")
    parser.add_argument("--launcher", default="inline", choices=LAUNCHERS, help="inline: every stage in this "
                        "process, one after another (default); local: each stage a job on this machine, --jobs at "
                        "once; slurm: each stage a SLURM job, started when the jobs it needs succeeded")
    parser.add_argument("--jobs", type=int, default=1, help="stages at once with --launcher local (default: 1); "
                        "each gets its share of the CPU threads and, where there are GPUs, the GPUs its kind asks "
                        "for (resources) to itself")
    parser.add_argument("--status", action="store_true", help="print every stage's state (done, running, queued, "
                        "finished, failed with its log's last line, to run) and start nothing; the report, always "
                        "made again, is never done")
    parser.add_argument("--dry-run", action="store_true", help="print the stages that would run (or be "
                        "submitted), what each waits for and asks for, and start nothing")
    options = parser.parse_args(args)
    with errors_as_one_line():
        check_launch(options.launcher, options.jobs)
        path = preset_path(options.preset)
        preset = load_preset(path)
        preset.wandb_project = options.wandb_project or preset.wandb_project
        reproduction = Reproduction(preset, path.stem, Path(options.runs), Path(options.results))
        stages, folder = reproduction.stages(), reproduction.runs / "jobs"
        resources = resources_for(preset.resources)
        if options.status:
            print_status(stages, folder)
        elif options.dry_run:
            print_graph(stages, resources, options.launcher)
        else:
            if preset.wandb_project:
                ensure_wandb_ready()
            for path, what in ((options.runs, "--runs"), (options.results, "--results")):
                ensure_writable(path, what)
            reproduction.check_no_records_lost(stages)
            _launch(reproduction, stages, options, resources)


def _launch(reproduction: Reproduction, stages: list[Stage], options: argparse.Namespace,
            resources: Callable[[str], Resources]) -> None:
    """Run the stages that are not done with the chosen launcher."""
    if options.launcher == "inline":
        run_inline(stages)
        print(f"table: {reproduction.results / 'table.md'}")
        return
    preset, folder = reproduction.preset, reproduction.runs / "jobs"
    threads = preset.threads or (max(1, available_cpus() // options.jobs) if options.launcher == "local" else None)
    job = partial(run_stage, replace(preset, threads=threads), reproduction.name,
                  str(Path(options.runs).resolve()), str(Path(options.results).resolve()))
    if options.launcher == "slurm":
        submit_slurm(stages, job, folder, reproduction.name, resources)
        return
    failed = run_local(stages, job, folder, options.jobs, resources)
    if failed:
        raise TrajrepError(f"{len(failed)} stage(s) failed or could not start ({', '.join(failed[:3])}"
                           f"{', ...' if len(failed) > 3 else ''}); see --status for their logs, fix the cause and "
                           "run the same command again: finished stages are kept")
    print(f"table: {reproduction.results / 'table.md'}")

if __name__ == "__main__":
    # Through the imported module, not __main__: the jobs' run_stage must be importable by name in each job.
    from trajrep import reproduce

    reproduce.main()
