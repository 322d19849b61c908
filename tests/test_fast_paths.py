"""Pretraining fast paths change speed, not results: a few training steps with each switch give the losses of the
same steps without it (CPU; bf16 within bf16's precision)."""

import lightning.pytorch as pl
import pytest
import torch

from trajrep.pretrain.ema import EMA
from trajrep.data.synthetic import SyntheticShapes
from trajrep.pretrain.module import PretrainModule

SIZES = dict(encoder_depth=10, widen_factor=0.25, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,),
             dropout=0.0, warmup_steps=1, lr=1e-3)  # no dropout: a compiled graph draws its masks differently
STEPS = 3


class LossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())


def train_losses(model: dict | None = None, trainer: dict | None = None, data: dict | None = None) -> list[float]:
    pl.seed_everything(0)
    images = SyntheticShapes(num_train=64, num_test=16, batch_size=8, **(data or {}))
    channels, size, _ = images.image_shape
    module = PretrainModule(image_channels=channels, image_size=size, **SIZES, **{"compile": False, **(model or {})})
    recorder = LossRecorder()
    pl.Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[recorder],
               **(trainer or {})).fit(module, images)
    return recorder.losses


@pytest.fixture(scope="module")
def reference_losses() -> list[float]:
    return train_losses()


@pytest.fixture(autouse=True)
def _restore_matmul_precision():
    previous = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(previous)


@pytest.mark.parametrize("switch, rtol", [
    (dict(model={"channels_last": True}), 1e-4),
    (dict(model={"matmul_precision": "high"}), 1e-4),
    (dict(data={"device_resident": True}), 1e-6),
    (dict(model={"adam_impl": "foreach"}), 1e-4),
    (dict(model={"adam_impl": "fused"}), 1e-4),
    (dict(trainer={"precision": "bf16-mixed"}), 3e-2),
], ids=["channels_last", "matmul_precision", "device_resident", "foreach_adam", "fused_adam", "bf16"])
def test_fast_path_keeps_the_training_losses(switch, rtol, reference_losses):
    losses = train_losses(**switch)
    assert torch.get_float32_matmul_precision() == "highest"  # a process-wide setting is put back after fit
    assert len(losses) == len(reference_losses) == STEPS
    assert reference_losses[-1] != reference_losses[0]  # the steps train, so a wrong update would show
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), rtol=rtol, atol=0)


@pytest.mark.slow
def test_compiled_networks_keep_the_training_losses(reference_losses, monkeypatch):
    # Dynamo captures the encoder and the score net and AOT autograd differentiates them as under inductor; the
    # aot_eager backend leaves out inductor's C++ code generation, three minutes of gcc on a CPU (the inductor
    # build is timed on a GPU by benchmarks/gpu.py).
    compile_module, compiled = torch.nn.Module.compile, []

    def compile_without_codegen(network: torch.nn.Module, **options) -> None:
        compiled.append(type(network).__name__)
        compile_module(network, **{**options, "backend": "aot_eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", compile_without_codegen)
    losses = train_losses(model={"compile": True})
    assert sorted(compiled) == ["ScoreUNet", "TimeConditionedWRN"]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), rtol=1e-4, atol=0)


def test_device_resident_loader_serves_the_same_batches():
    loaders = []
    for device_resident in (False, True):
        torch.manual_seed(0)
        images = SyntheticShapes(num_train=40, num_test=8, batch_size=16, device_resident=device_resident)
        loaders.append(list(images.train_dataloader()))
    plain, resident = loaders
    assert len(plain) == len(resident) == 2  # drop_last: 40 images give two full batches
    for (plain_images, plain_labels), (resident_images, resident_labels) in zip(plain, resident):
        assert torch.equal(plain_images, resident_images) and torch.equal(plain_labels, resident_labels)


def test_matmul_precision_is_put_back_when_ema_calls_configure_model_too(tmp_path):
    # EMA (Lightning's WeightAveraging) calls configure_model before the Trainer does: the setting must not be
    # remembered as the process's own.
    pl.seed_everything(0)
    module = PretrainModule(image_channels=3, image_size=32, matmul_precision="medium", **SIZES)
    pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, limit_val_batches=0, callbacks=[EMA(decay=0.9)]
               ).fit(module, SyntheticShapes(num_train=32, num_test=8, batch_size=8))
    assert torch.get_float32_matmul_precision() == "highest"
