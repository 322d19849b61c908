import os
import pathlib
from collections.abc import Callable
import signal
import subprocess
import tempfile
import time

import pytest

# W&B must never need an account or the network in tests.
os.environ["WANDB_MODE"] = "disabled"
os.environ.pop("TRAJREP_DEBUG", None)

REPO = pathlib.Path(__file__).parents[1]
QUICKSTART = "configs/quickstart.yaml"


def tiny_fit_args(root: pathlib.Path, max_steps: int, *extra: str) -> list[str]:
    """The quickstart config shrunk to seconds: few steps, small batches and widths, no validation."""
    return [
        "fit", "--config", str(REPO / QUICKSTART),
        f"--trainer.max_steps={max_steps}", f"--trainer.default_root_dir={root}",
        "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
        "--trainer.callbacks.init_args.dirpath", str(root / "checkpoints"),  # ModelCheckpoint
        "--trainer.callbacks.init_args.every_n_train_steps=1",
        "--data.init_args.batch_size=8", "--data.init_args.num_train=64",
        "--model.init_args.nf=8", "--model.init_args.widen_factor=0.125",
        *extra,
    ]


@pytest.fixture(autouse=True)
def restore_environment():
    """Lightning's launchers set process-group variables (MASTER_PORT, LOCAL_RANK, ...); keep tests independent."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> pathlib.Path:
    """A 2-step pretraining run of the shrunk quickstart, shared by the extraction and probe tests."""
    from trajrep.cli import main

    root = tmp_path_factory.mktemp("pretrain")
    main(tiny_fit_args(root, max_steps=2))
    return root / "checkpoints" / "last.ckpt"


def kill_when(command: list[str], ready: Callable[[], bool], cwd: pathlib.Path, timeout: float = 300) -> None:
    """Start `command`, SIGKILL it (and any child) as soon as `ready()` holds; fail if it ends or times out first."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a full pipe would stall a chatty child
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        deadline = time.monotonic() + timeout
        while not ready():
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"the run ended before it could be killed: {log.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                pytest.fail("the run never reached the point to kill it at")
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
