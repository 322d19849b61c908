"""Probe result files: JSON records with a checksum, written atomically; tables are built from these alone."""

import dataclasses
import hashlib
import json
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from trajrep.checks import ensure_writable
from trajrep.disk import atomic_write_bytes
from trajrep.errors import TrajrepError
from trajrep.probe.kinds import kind_of_options, options_from_config

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule

RESULTS_VERSION = 1


def git_revision() -> str | None:
    """The commit of the trajrep checkout this process started from, "+dirty" when its tracked files differed
    from it (None outside a git checkout). Read once, at import: a long run whose checkout moves on meanwhile
    still names the code it loaded."""
    return _REVISION


def _read_revision() -> str | None:
    here = Path(__file__).parents[1]  # the trajrep package
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    revision = head.stdout.strip()
    return (revision + ("+dirty" if dirty.stdout.strip() else "")) if revision else None


_REVISION = _read_revision()


def probe_label(context: dict) -> str:
    """The probe kind, marked "-replicated" for the capacity control (one t repeated at every position) and
    "-layers" over (layer, t) tokens of denoiser features."""
    return (context.get("probe") + ("-replicated" if context.get("replicated_time") is not None else "")
            + ("-layers" if context.get("layer_tokens") else ""))


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def result_path(results_dir: str | Path, context: dict) -> Path:
    """`<results_dir>/<probe label>-<cache key>[-<layer>]-<settings digest>.json`: probes of other settings on the
    same cache (another lr grid, epochs, split, or another layer of denoiser features) never share a file."""
    digest, layer = context.get("settings_digest"), context.get("layer")
    return Path(results_dir) / (f"{probe_label(context)}-{context.get('cache_key', 'nocache')}"
                                f"{'-' + layer if layer else ''}{'-' + digest if digest else ''}.json")


def refuse_replacing(path: Path, overwrite: bool) -> None:
    """Results of the same settings are replaced only when asked."""
    if path.exists() and not overwrite:
        raise TrajrepError(f"{path} already holds results of these settings; pass --model.overwrite_results=true "
                           "to replace them, or another --model.results_dir")


def settings_digest(settings: dict) -> str:
    """A short hash of what a probe's numbers depend on besides the representations (their cache key)."""
    return _digest(settings)[:8]


def write_results(results_dir: str | Path, records: list[dict], summary: dict, context: dict,
                  overwrite: bool = False) -> Path:
    """Write the result file (`result_path`): per-member records (each with the fields a table needs), the per-task
    summary and the run context. Written to a temporary file and renamed: never half a file. An existing file of
    the same settings is replaced only with `overwrite`."""
    shared = {k: context.get(k) for k in ("dataset", "encoder_mode", "encoder_name", "latent_dim", "pretrain_seed",
                                          "pretrain_steps", "cache_key", "times")}
    shared["git_revision"] = git_revision()
    payload = {
        "version": RESULTS_VERSION,
        "records": [{**shared, **record} for record in records],
        "summary": summary,
        "context": context,
    }
    path = result_path(results_dir, context)
    refuse_replacing(path, overwrite)
    atomic_write_bytes(path, json.dumps({**payload, "sha256": _digest(payload)}, indent=1).encode(), "probe results")
    return path


def read_results(path: str | Path) -> dict:
    """A result file, checked against its checksum."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        stored = data.pop("sha256")
    except (OSError, ValueError, KeyError) as error:
        raise TrajrepError(f"result file {path} is unreadable ({error}); delete it and rerun the probe") from None
    if stored != _digest(data):
        raise TrajrepError(f"result file {path} was modified or truncated (checksum mismatch); delete it and rerun "
                           "the probe")
    return data


# Options that change where results go or how fast they come, never the numbers: left out of the settings digest.
RESULT_NEUTRAL = {"results_dir", "encoder_name", "export_attention", "member_chunk", "overwrite_results"}
DATA_SETTINGS = ("val_fraction", "split_seed", "batch_size", "standardize", "replicate_time")
# The digest takes the settings in the form they had before the probe package and typed head options (#16), so that
# a result file keeps the name it had (and a rerun of the same settings replaces a committed record instead of
# joining it): kNN's class path as it was (ProbeModule's needs no entry: the package exposes it, so its path is still
# recorded as trajrep.probe.ProbeModule), and the head as `kind` and `head_kwargs` (`untyped_head`). An option
# given at its default counts as not given, as it always should have.
LEGACY_CLASS_PATHS = {"trajrep.probe.knn.KNNProbe": "trajrep.knn.KNNProbe"}


def untyped_head(model: dict) -> dict:
    """Model settings with the head's options (`head`: class path and init args) as they were given before they
    were typed: the kind, and `head_kwargs`, the options set away from their defaults (None if none). Settings
    without a head (kNN's, older records') are returned as they are."""
    head = model.get("head")
    if not isinstance(head, dict):
        return model
    options = options_from_config(head)
    defaults = type(options)()
    changed = {field.name: getattr(options, field.name) for field in dataclasses.fields(options)
               if getattr(options, field.name) != getattr(defaults, field.name)}
    return {**{key: value for key, value in model.items() if key != "head"}, "kind": kind_of_options(options),
            "head_kwargs": changed or None}


def result_settings_digest(model: dict, data: dict, max_epochs: int | None) -> str:
    """The digest of the settings a probe's numbers depend on: its model options, the data options that change
    what it trains on, and its epochs."""
    model = {key: LEGACY_CLASS_PATHS.get(value, value) if key == "_class_path" else value
             for key, value in untyped_head(model).items() if key not in RESULT_NEUTRAL}
    return settings_digest({"model": model, "data": {key: data.get(key) for key in DATA_SETTINGS},
                            "max_epochs": max_epochs})


def result_context(module: "LightningModule", probe: str, epochs: int | None) -> dict:
    """What a result file says about its run: the data's metadata (encoder, cache, standardisation), the probe,
    its epochs (None for a probe without training), the resolved configuration and the digest of the settings
    the numbers depend on (part of the file name)."""
    datamodule = module.trainer.datamodule
    data = dict(getattr(datamodule, "hparams", {}))
    return {
        **getattr(datamodule, "metadata", {}),
        "probe": probe,
        "encoder_name": module.hparams.encoder_name,
        "times": module.hparams.times,
        "epochs": epochs,
        "config": {"model": dict(module.hparams), "data": data},
        "settings_digest": result_settings_digest(dict(module.hparams), data, module.trainer.max_epochs),
    }


def ensure_results_can_be_written(module: "LightningModule", probe: str) -> None:
    """Before any training: the results folder is writable and holds no results of these settings (unless
    overwrite_results), so a finished grid never fails at its last line."""
    if not module.trainer.is_global_zero:
        return
    ensure_writable(module.hparams.results_dir, "results_dir")
    refuse_replacing(result_path(module.hparams.results_dir, result_context(module, probe, None)),
                     module.hparams.overwrite_results)
