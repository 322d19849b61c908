import os
import pathlib
import pickle
from collections.abc import Callable
import signal
import subprocess
import tempfile
import time

import numpy as np
import pytest
import torchvision

# W&B must never need an account or the network in tests.
os.environ["WANDB_MODE"] = "disabled"
os.environ.pop("TRAJREP_DEBUG", None)

REPO = pathlib.Path(__file__).parents[1]
QUICKSTART = "configs/quickstart.yaml"
CHECKOUT_OUTPUTS = pytest.StashKey[dict]()


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


def fake_cifar(root: pathlib.Path, monkeypatch, variant: str = "cifar10",
               per_batch: int = 4) -> dict[str, tuple[np.ndarray, list[int]]]:
    """A tiny CIFAR-10 (or CIFAR-100) folder in torchvision's python format, `per_batch` random images per batch
    file; the md5 check is patched out since the files are fake."""
    reader = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[variant]
    folder = root / reader.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    label_key, num_classes = ("labels", 10) if variant == "cifar10" else ("fine_labels", 100)
    batches = {}
    for name, _ in reader.train_list + reader.test_list:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, num_classes, size=per_batch).tolist()
        (folder / name).write_bytes(pickle.dumps({"data": data, label_key: labels}))
        batches[name] = (data, labels)
    meta = {reader.meta["key"]: [f"c{i}" for i in range(num_classes)]}
    (folder / reader.meta["filename"]).write_bytes(pickle.dumps(meta))
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: True)
    return batches


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


def kill_when(command: list[str], ready: Callable[[], bool], cwd: pathlib.Path, timeout: float = 300,
              sig: signal.Signals = signal.SIGKILL) -> int:
    """Start `command`, send `sig` to it and any child (SIGINT: as Ctrl+C does) as soon as `ready()` holds, and
    return its exit code; fail if it ends or times out first."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a full pipe would stall a chatty child
        # SIGINT back to its default in the child: a shell starts background jobs with SIGINT ignored, and an
        # ignored SIGINT would be inherited, so the child would never see the Ctrl+C the test sends.
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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
        os.killpg(process.pid, sig)
        return process.wait(timeout=120)


@pytest.fixture
def scratch_cwd(tmp_path, monkeypatch) -> pathlib.Path:
    """A working folder under tmp_path where `configs/` is the repository's: commands can name configs as the
    README does while their default outputs (runs/, results/, cache/, lightning_logs/) land in the scratch folder."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(cwd)
    return cwd


# Where a trajrep command writes by default, relative to its working folder (the configs' default_root_dir,
# results_dir and cache_dir, Lightning's lightning_logs, the smoke preset's folders, which tests build presets
# from): the suite must leave these untouched in the checkout.
DEFAULT_OUTPUTS = ("runs/quickstart", "runs/fashion_mnist", "runs/cifar10", "runs/cifar100", "runs/probe",
                   "results/quickstart", "results/probes", "lightning_logs", "runs/smoke", "results/smoke",
                   "cache/smoke")


def default_outputs_in_checkout() -> dict[str, int]:
    """Every file under DEFAULT_OUTPUTS with its mtime, and the entries directly in cache/ (a default-cache_dir
    extraction adds one there; presets write into their own subfolders)."""
    found = {str(path.relative_to(REPO)): path.stat().st_mtime_ns
             for folder in DEFAULT_OUTPUTS for path in (REPO / folder).rglob("*") if path.is_file()}
    cache = REPO / "cache"
    found.update({f"cache/{entry.name}": 0 for entry in (cache.iterdir() if cache.is_dir() else [])})
    return found


def pytest_sessionstart(session):
    session.config.stash[CHECKOUT_OUTPUTS] = default_outputs_in_checkout()


def pytest_sessionfinish(session, exitstatus):
    before, after = session.config.stash[CHECKOUT_OUTPUTS], default_outputs_in_checkout()
    written = sorted(path for path, stamp in after.items() if before.get(path) != stamp)
    if written:
        print(f"\nThe tests wrote into the checkout (they must write under tmp_path): {', '.join(written[:10])}"
              + (f" and {len(written) - 10} more" if len(written) > 10 else ""))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def sigint_restored():
    """Lightning answers a KeyboardInterrupt inside a Trainer call by ignoring SIGINT for the rest of the process
    (a test raises one on purpose); subprocesses would inherit that, and could no longer be interrupted."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)
