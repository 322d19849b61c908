"""Probe result files: JSON records with a checksum, written atomically; tables are built from these alone."""

import hashlib
import json
import subprocess
from pathlib import Path

from trajrep.disk import atomic_write_bytes
from trajrep.errors import TrajrepError

RESULTS_VERSION = 1


def git_revision() -> str | None:
    """The commit of the trajrep checkout this process started from, "+dirty" when its tracked files differed
    from it (None outside a git checkout). Read once, at import: a long run whose checkout moves on meanwhile
    still names the code it loaded."""
    return _REVISION


def _read_revision() -> str | None:
    here = Path(__file__).parent
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
