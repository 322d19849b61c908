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


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX), as oneDNN decides for its kernels."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def ensure_trainer_fits_machine(trainer) -> None:
    """A CPU run must not ask for more processes than the CPUs it may use: each would crawl. bf16 on a CPU without
    bf16 instructions is emulated (measured on an AVX2-only CPU: 0.12x fp32's steps/s, benchmarks/RESULTS.md), so
    it gets a warning line. (fp16 mixed precision on CPU needs no check: Lightning runs it as bf16-mixed and says
    so.)"""
    from lightning.pytorch.accelerators import CPUAccelerator
    from lightning.pytorch.utilities import rank_zero_warn

    from trajrep.threads import available_cpus

    if not isinstance(trainer.accelerator, CPUAccelerator):
        return
    cpus = available_cpus()
    if trainer.num_devices > cpus:
        raise TrajrepError(f"trainer.devices {trainer.num_devices} on CPU needs a CPU per process, and this process "
                           f"may use {cpus}; set --trainer.devices to {cpus} or fewer")
    precision = str(trainer.precision)
    if precision.startswith("bf16") and not cpu_has_bf16():
        rank_zero_warn(f"precision {precision} on a CPU without bf16 instructions (AVX512-BF16 or AMX) is emulated "
                       "and runs several times slower than fp32: pass --trainer.precision=32-true")
