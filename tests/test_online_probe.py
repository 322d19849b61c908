"""OnlineProbe: the probe's numbers mean what they say, it logs one accuracy per t, and it leaves training alone."""

import csv
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from conftest import REPO, tiny_fit_args
from test_resume import weights
from trajrep.cli import main
from trajrep.data.synthetic import SyntheticShapes
from trajrep.errors import TrajrepError
from trajrep.pretrain.online_probe import (OnlineProbe, accuracy_name, between_image_fraction, ridge_probe_accuracy,
                                  split_accuracy_name, subset_sizes)
from trajrep.pretrain.module import PretrainModule

TINY = dict(image_channels=3, image_size=32, encoder_depth=10, widen_factor=0.125, nf=8, ch_mult=(1, 2, 2),
            num_res_blocks=1, attn_resolutions=(8,), warmup_steps=1)
SMALL_SUBSET = dict(num_train=40, num_heldout=16)
# The probe by its short name on the command line, appended after ModelCheckpoint (the tiny args reach that one
# first), every 2 steps on the small subset.
PROBE_ARGS = ["--trainer.callbacks+=OnlineProbe", "--trainer.callbacks.init_args.every_n_steps=2",
              "--trainer.callbacks.init_args.num_train=40", "--trainer.callbacks.init_args.num_heldout=16"]


def gaussian_classes(n: int, d: int = 8, classes: int = 4, separation: float = 10.0, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (n,), generator=generator)
    means = separation * torch.randn(classes, d, generator=generator)
    return means[labels] + torch.randn(n, d, generator=generator), labels


def test_ridge_probe_separates_gaussians_and_is_at_chance_on_shuffled_labels():
    x, y = gaussian_classes(2000)
    accuracy = ridge_probe_accuracy(x[:1500], y[:1500], x[1500:], y[1500:], num_classes=4)
    assert accuracy > 0.99
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    chance = ridge_probe_accuracy(x[:1500], shuffled[:1500], x[1500:], shuffled[1500:], num_classes=4)
    assert abs(chance - 0.25) < 0.06


def test_ridge_probe_runs_per_leading_index():
    good, y = gaussian_classes(600)
    noise = torch.randn(600, 8, generator=torch.Generator().manual_seed(2))
    accuracy = ridge_probe_accuracy(torch.stack([good, noise])[:, :500], y[:500], torch.stack([good, noise])[:, 500:],
                                    y[500:], num_classes=4)
    assert accuracy.shape == (2,) and accuracy[0] > 0.99 and accuracy[1] < 0.5


def test_between_image_fraction_is_zero_for_constant_and_one_for_centred_features():
    constant = torch.randn(1, 16).expand(50, 16)
    assert between_image_fraction(constant) < 1e-12
    assert between_image_fraction(torch.zeros(50, 16)) == 0
    features = torch.randn(50, 16) + 3
    centred = features - features.mean(dim=0)
    assert between_image_fraction(centred) == pytest.approx(1.0)
    assert 0 < between_image_fraction(features) < 0.2  # mostly the common offset


def test_the_pixel_reference_of_a_small_latent_keeps_its_top_principal_components():
    data = SyntheticShapes(num_train=1200, num_test=100)
    probe = OnlineProbe(num_train=1000, num_heldout=200)
    one, many = probe.pixel_accuracy(data, 1), probe.pixel_accuracy(data, 32)
    assert set(one) == set(many) == set(data.task_names)
    assert one["background"] < 0.5 < many["background"]  # 9 colours: one direction cannot tell them apart


def test_accuracy_names_split_back_into_task_and_t_even_when_a_task_name_has_underscores():
    assert accuracy_name("class", 0.5) == "online/acc_class_t0.5"
    assert split_accuracy_name(accuracy_name("Wavy_Hair", 0.25)) == ("Wavy_Hair", "t0.25")


def test_a_small_training_split_shrinks_the_subset_in_proportion():
    assert subset_sizes(60000, 5000, 1000) == (5000, 1000)
    assert subset_sizes(3000, 5000, 1000) == (2500, 500)
    assert subset_sizes(2, 5000, 1000) == (1, 1)
    with pytest.raises(TrajrepError):
        subset_sizes(1, 5000, 1000)


def test_each_task_is_probed_on_its_own_labels():
    data = SyntheticShapes(num_train=1200, num_test=100)
    probe = OnlineProbe(num_train=1000, num_heldout=200, tasks=[3, 0])
    assert list(probe.pixel_accuracy(data)) == ["shape", "background"]
    train = data.dataset("train")
    drawn = torch.randperm(len(train), generator=torch.Generator().manual_seed(probe.seed))[:1200]
    expected = torch.stack([train[i][1] for i in drawn.tolist()])[:, [3, 0]]
    assert torch.equal(probe._labels, expected.long())
    with pytest.raises(TrajrepError, match=r"tasks \[4\] do not exist"):
        OnlineProbe(tasks=[4]).pixel_accuracy(data)


@pytest.mark.parametrize("kwargs", [dict(every_n_steps=-1), dict(times=()), dict(times=(0.5, 2.0)),
                                    dict(num_heldout=0), dict(ridge=0.0), dict(tasks=[]), dict(tasks=[0, 0, 1])])
def test_bad_settings_are_clear_errors(kwargs):
    with pytest.raises(TrajrepError, match="OnlineProbe"):
        OnlineProbe(**kwargs)


def fit(root: Path, max_steps: int, callbacks: list[pl.Callback], **model) -> PretrainModule:
    pl.seed_everything(0, verbose=False)
    module = PretrainModule(**TINY, **model)
    pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=CSVLogger(root), enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
               callbacks=callbacks).fit(module, SyntheticShapes(num_train=64, batch_size=8))
    return module


def online_rows(root: Path) -> list[dict[str, str]]:
    (metrics,) = root.glob("lightning_logs/version_*/metrics.csv")
    with metrics.open() as f:
        return [row for row in csv.DictReader(f) if row.get("online/seconds")]


def probe_lines(caplog) -> list[int]:
    """The steps of the one-line reports the probe printed."""
    return [int(step) for step in re.findall(r"online probe at step (\d+)", caplog.text)]


def test_logs_one_accuracy_per_task_and_t_every_n_steps_and_at_the_last_step(tmp_path, caplog):
    times = (0.0, 0.5, 1.0)
    fit(tmp_path, 5, [OnlineProbe(every_n_steps=2, times=times, **SMALL_SUBSET)])
    rows = online_rows(tmp_path)
    assert [int(row["step"]) for row in rows] == [2, 4, 5]
    accuracy_keys = sorted(key for key in rows[0] if key.startswith("online/acc_"))
    assert accuracy_keys == sorted(f"online/acc_{task}_t{t:g}" for task in SyntheticShapes().task_names
                                   for t in times)
    for row in rows:
        assert all(0 <= float(row[key]) <= 1 for key in accuracy_keys)
        assert 0 <= float(row["online/cka_t0_t1"]) <= 1 + 1e-6
        assert 0 < float(row["online/between_image_fraction"]) <= 1
        assert all(row[f"online/between_image_fraction_t{t:g}"] for t in times)
    assert probe_lines(caplog) == [2, 4, 5]


def test_a_score_only_run_keeps_the_probe_idle_and_says_why(tmp_path, caplog):
    # A preset's one pretraining config serves every mode, so a score-only model must not stop at the callback.
    with pytest.warns(UserWarning, match="score-only .* the callback stays idle"):
        fit(tmp_path, 3, [OnlineProbe(every_n_steps=1, **SMALL_SUBSET)], mode="score-only")
    assert not any("online/" in path.read_text() for path in tmp_path.rglob("metrics.csv"))
    assert not probe_lines(caplog)


class CheckedProbe(OnlineProbe):
    """Asserts, around every probe, that it draws no random numbers and leaves the module as it found it."""

    runs = 0

    def probe(self, trainer, pl_module):
        rng, state = torch.get_rng_state(), {k: v.clone() for k, v in pl_module.state_dict().items()}
        modes = [m.training for m in pl_module.modules()]
        metrics = super().probe(trainer, pl_module)
        assert torch.equal(rng, torch.get_rng_state())
        assert [m.training for m in pl_module.modules()] == modes
        for name, value in pl_module.state_dict().items():
            assert torch.equal(value, state[name]), name
        self.runs += 1
        return metrics


def test_probing_every_step_leaves_training_bit_identical(tmp_path):
    probe = CheckedProbe(every_n_steps=1, **SMALL_SUBSET)
    probed = fit(tmp_path / "probed", 4, [probe])
    plain = fit(tmp_path / "plain", 4, [])
    assert probe.runs == 4
    for name, value in plain.state_dict().items():
        assert torch.equal(probed.state_dict()[name], value), name


@pytest.mark.slow
def test_a_resumed_run_with_the_probe_firing_equals_a_straight_one(tmp_path, caplog):
    main(tiny_fit_args(tmp_path / "straight", 6) + PROBE_ARGS)
    resumed = tmp_path / "resumed"
    main(tiny_fit_args(resumed, 3) + PROBE_ARGS)
    main(tiny_fit_args(resumed, 6) + PROBE_ARGS + ["--ckpt_path", str(resumed / "checkpoints" / "last.ckpt")])
    assert probe_lines(caplog) == [2, 4, 6, 2, 3, 4, 6]
    straight, again = (weights(root / "checkpoints" / "last.ckpt") for root in (tmp_path / "straight", resumed))
    assert straight.keys() == again.keys()
    for name, value in straight.items():
        torch.testing.assert_close(again[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_under_ddp_rank_zero_probes_and_no_rank_hangs(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    main(tiny_fit_args(tmp_path, 4) + PROBE_ARGS + ["--trainer.accelerator=cpu", "--trainer.devices=2",
                                                    "--trainer.strategy=ddp_spawn", "--trainer.logger=CSVLogger",
                                                    f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert [int(row["step"]) for row in online_rows(tmp_path)] == [2, 4]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
