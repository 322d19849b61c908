"""ProgressLog: with progress bars off, long stages still say how far they are, and end with a summary line."""

import functools
import re
import warnings

import lightning.pytorch as pl
import pytest
import torch

from conftest import tiny_fit_args
from test_online_probe import TINY
from trajrep.cli import main
from trajrep.lightning_cli import build_cli
from trajrep.data.synthetic import SyntheticShapes
from trajrep.pretrain.module import PretrainModule
import trajrep.analysis.mi as mine_module
from trajrep.progress import ProgressLog, Ticker, duration
from trajrep.quiet import HARMLESS_WARNINGS


def test_every_batch_prints_step_total_rate_eta_and_loss_then_a_summary(tmp_path, caplog):
    pl.seed_everything(0, verbose=False)
    pl.Trainer(accelerator="cpu", max_steps=3, logger=pl.loggers.CSVLogger(tmp_path), log_every_n_steps=1,
               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               limit_val_batches=0, callbacks=[ProgressLog(every_seconds=0)]
               ).fit(PretrainModule(**TINY), SyntheticShapes(num_train=64, batch_size=8))
    lines = re.findall(r"PretrainModule fit, epoch 0, step (\d)/3 \(\d+ %\), [\d.e+]+/s, ETA [^;]+; train/loss [\d.]+",
                       caplog.text)
    assert lines == ["1", "2", "3"]
    assert re.search(r"PretrainModule fit done: 3 steps in \d+ s \([\d.]+ steps/s\), at step 3; train/loss", caplog.text)


def test_the_cli_adds_it_only_when_the_progress_bar_is_off(tmp_path):
    def has_progress_log(*extra):
        cli = build_cli(tiny_fit_args(tmp_path, 2, *extra)[1:], run=False)
        return any(isinstance(callback, ProgressLog) for callback in cli.trainer.callbacks)

    assert has_progress_log()  # tiny_fit_args turn the bar off
    assert not has_progress_log("--trainer.enable_progress_bar=true")


def test_a_cli_fit_with_bars_off_ends_with_its_summary(tmp_path, caplog):
    main(tiny_fit_args(tmp_path, 2))
    assert "PretrainModule fit done: 2 steps" in caplog.text


def test_durations_read_naturally():
    assert [duration(s) for s in (12, 270, 7560)] == ["12 s", "4.5 min", "2.1 h"]


def test_known_harmless_messages_are_silenced_and_real_warnings_kept(tmp_path, caplog, recwarn):
    main(tiny_fit_args(tmp_path, 2, "--trainer.precision=bf16-mixed", "--trainer.enable_model_summary=true"))
    messages = [str(w.message) for w in recwarn]
    for text, _why in HARMLESS_WARNINGS:
        assert not any(m.startswith(text) for m in messages), text
    assert "litlogger" not in caplog.text
    with pytest.warns(UserWarning, match="a real problem"):
        warnings.warn("a real problem", UserWarning)


def test_mine_prints_its_progress_through_the_same_ticker(monkeypatch, caplog):
    monkeypatch.setattr(mine_module, "Ticker", functools.partial(Ticker, every_seconds=0))
    x = torch.randn(1, 64, 2)
    mine_module.mine_pairs(x, x, steps=5, batch_size=16, window=2, progress=True)
    assert re.search(r"MINE \(1 pairs, seed 0\), step 5/5 \(100 %\), [\d.e+]+/s, ETA 0 s; mean bound", caplog.text)
