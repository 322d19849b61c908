"""The online probe's cost against pretraining time, per probe interval, in one process.

Pretraining steps of a preset's model (the Fashion-MNIST CPU preset by default) are timed as in
benchmarks/pretrain.py; then OnlineProbe.probe (encode the subset at every t, fit the ridge probes, compute CKA and
the between-image fraction) is timed on the trained model. Both alternate for `--rounds` rounds, best of each
kept. Prints the ratio (probe seconds) / (pretraining seconds of `--every-n-steps` steps), and the smallest
interval under 10 %.

    python benchmarks/online_probe.py [--preset fashion|cifar10] [--data fashion|shapes] [--every-n-steps 500]
                                      [--steps 5] [--warmup 2] [--rounds 2] [--precision 32-true]
"""

import argparse
import math

import lightning.pytorch as pl
import torch

from trajrep.data import FashionMNIST, SyntheticShapes
from trajrep.pretrain.online_probe import OnlineProbe, subset_sizes
from trajrep.pretrain.module import PretrainModule

from common import best_seconds  # benchmarks/common.py
from pretrain import PRESETS, StepClock  # benchmarks/pretrain.py

# The datamodule and its arguments; shapes (3 x 32 x 32, no files needed) has only 5,760 images in all, so the
# probe's subset shrinks to 4,717 + 943.
DATA = {"fashion": (FashionMNIST, {}), "shapes": (SyntheticShapes, {"num_train": 5660, "num_test": 100})}


def step_seconds(module: PretrainModule, data: pl.LightningDataModule, probe: OnlineProbe, steps: int,
                 warmup: int, precision: str) -> float:
    """Seconds per training step after `warmup` steps; the fit also sets up `probe` (which never fires)."""
    clock = StepClock(warmup)
    pl.Trainer(accelerator="auto", devices=1, max_steps=steps + warmup, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, gradient_clip_val=1.0,
               precision=precision, callbacks=[clock, probe]).fit(module, data)
    return clock.seconds / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="fashion", help="model sizes and batch size")
    parser.add_argument("--data", choices=sorted(DATA), default="fashion")
    parser.add_argument("--every-n-steps", type=int, default=OnlineProbe().every_n_steps,
                        help="the probe interval to price (default: OnlineProbe's)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of both sides; the best of each is kept")
    parser.add_argument("--precision", default="32-true", help="the Trainer's precision (the presets: 32-true "
                        "for fashion_mnist.yaml, bf16-mixed for the CIFAR configs and the cpu preset)")
    args = parser.parse_args()
    sizes, batch_size = PRESETS[args.preset]
    data_class, data_args = DATA[args.data]
    data = data_class(**data_args, batch_size=batch_size)
    pl.seed_everything(0, verbose=False)
    module = PretrainModule(image_channels=data.image_shape[0], image_size=data.image_shape[-1], **sizes,
                            warmup_steps=1)
    probe = OnlineProbe(every_n_steps=0, at_end=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"online probe vs pretraining: {args.preset} preset sizes, {args.data} data "
          f"{'x'.join(map(str, data.image_shape))}, batch {batch_size}, {args.precision}, on {name}")

    step, probe_seconds = math.inf, math.inf
    for round_index in range(args.rounds):
        step = min(step, step_seconds(module, data, probe, args.steps, args.warmup, args.precision))
        trainer = module.trainer
        if round_index == 0:
            probe.probe(trainer, module)  # warm-up
        probe_seconds = min(probe_seconds, best_seconds(lambda: probe.probe(trainer, module), repeats=1,
                                                        device=module.device))
    train, heldout = subset_sizes(len(data.dataset("train")), probe.num_train, probe.num_heldout)
    print(f"pretraining: {step:.3f} s per step ({args.steps} timed steps after {args.warmup}, best of "
          f"{args.rounds} rounds)")
    print(f"probe: {probe_seconds:.2f} s for {train + heldout} images x {len(probe.times)} t "
          f"({train} train / {heldout} held out, pass size {probe.encoder_pass_size})")
    ratio = probe_seconds / (args.every_n_steps * step)
    print(f"ratio at every_n_steps={args.every_n_steps}: {probe_seconds:.2f} s / "
          f"({args.every_n_steps} x {step:.3f} s) = {ratio:.1%} of pretraining time")
    print(f"smallest interval under 10 %: {math.ceil(probe_seconds / (0.1 * step))} steps")


if __name__ == "__main__":
    main()
