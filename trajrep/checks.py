"""Up-front checks of what a run needs from its environment, so it fails at the start with one clear line rather
than after hours of work: folders it can write, and a W&B login or offline mode when W&B is asked for."""

import netrc
import os
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from trajrep.errors import TrajrepError

OFFLINE_MODES = ("offline", "disabled", "dryrun")


def ensure_writable(folder: str | Path, what: str) -> Path:
    """Create `folder` if needed and prove that files can be written in it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as error:
        raise TrajrepError(f"{what} {folder} is not a writable folder ({error.strerror or error}); choose another "
                           "path or fix its permissions") from None
    return folder


def wandb_logged_in() -> bool:
    """An API key in the environment or in ~/.netrc for the W&B host (where `wandb login` stores it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def ensure_wandb_ready() -> None:
    """W&B works offline with no account; online it needs a login, and would otherwise stop to prompt for one."""
    if os.environ.get("WANDB_MODE", "").lower() in OFFLINE_MODES or wandb_logged_in():
        return
    raise TrajrepError("W&B logging was asked for but there is no W&B login: run `wandb login` (or set "
                       "WANDB_API_KEY), or log offline with WANDB_MODE=offline and upload later with `wandb sync`")


def ensure_trainer_fits_machine(trainer) -> None:
    """A CPU run must not ask for more processes than the CPUs it may use: each would crawl. (fp16 mixed precision
    on CPU needs no check: Lightning runs it as bf16-mixed and says so.)"""
    from lightning.pytorch.accelerators import CPUAccelerator

    from trajrep.threads import available_cpus

    if not isinstance(trainer.accelerator, CPUAccelerator):
        return
    cpus = available_cpus()
    if trainer.num_devices > cpus:
        raise TrajrepError(f"trainer.devices {trainer.num_devices} on CPU needs a CPU per process, and this process "
                           f"may use {cpus}; set --trainer.devices to {cpus} or fewer")
