"""Pretraining steps/s: fp32 eager against each fast path and all of them together, in one process.

Random data of CIFAR shape (the synthetic shapes set, 3 x 32 x 32). Also prints each variant's achieved FLOP/s
as a fraction of a matmul peak measured in the same run (the bf16 peak for bf16 variants).

    python benchmarks/pretrain.py [--preset fashion|cifar10] [--steps 5] [--warmup 2] [--rounds 2] [--variants ...]
"""

import argparse
import time

import lightning.pytorch as pl
import torch
from torch.utils.flop_counter import FlopCounterMode

from trajrep.data.synthetic import SyntheticShapes
from trajrep.pretrain.module import PretrainModule

from common import matmul_peak, synchronize  # benchmarks/common.py

# Model sizes of configs/fashion_mnist.yaml (the CPU preset) and configs/cifar10.yaml (the paper preset).
PRESETS = {
    "fashion": (dict(encoder_depth=16, widen_factor=0.5, nf=16, ch_mult=(1, 2, 2), num_res_blocks=1,
                     attn_resolutions=(8,)), 64),
    "cifar10": (dict(encoder_depth=28, widen_factor=2, nf=16, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                     attn_resolutions=(16,)), 100),
}
ALL = dict(model={"compile": True, "channels_last": True, "matmul_precision": "high", "adam_impl": "foreach"},
           trainer={"precision": "bf16-mixed"}, data={"device_resident": True})
VARIANTS = {
    "fp32 eager": {},
    "bf16-mixed": dict(trainer={"precision": "bf16-mixed"}),
    "tf32 (matmul_precision high)": dict(model={"matmul_precision": "high"}),
    "compile": dict(model={"compile": True}),
    "channels_last": dict(model={"channels_last": True}),
    "device_resident data": dict(data={"device_resident": True}),
    "foreach Adam": dict(model={"adam_impl": "foreach"}),
    "fused Adam (fp32 only)": dict(model={"adam_impl": "fused"}),
    "all together": ALL,
}


class StepClock(pl.Callback):
    """Wall time of the training steps after the first `warmup` (compilation and allocator warm-up)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.seconds = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            synchronize(pl_module.device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        synchronize(pl_module.device)
        self.seconds = time.perf_counter() - self.start


def step_flops(module: PretrainModule, images: torch.Tensor) -> int:
    """FLOPs of one training step's forward and backward (the optimizer's elementwise work is not counted)."""
    x0 = images.float() / 255
    t = module.sde.sample_time(len(x0))
    counter = FlopCounterMode(display=False)
    with counter:
        terms = module.loss_terms(x0, t, torch.randn_like(x0))
        (terms["dsm"].mean() + terms["reg"].mean()).backward()
    module.zero_grad()
    return counter.get_total_flops()


def run(variant: dict, sizes: dict, batch_size: int, steps: int, warmup: int, accelerator: str) -> float:
    """Training steps per second of one variant."""
    pl.seed_everything(0)
    data = SyntheticShapes(num_train=batch_size * (steps + warmup), num_test=batch_size, batch_size=batch_size,
                           **variant.get("data", {}))
    module = PretrainModule(**sizes, warmup_steps=1, **{"compile": False, **variant.get("model", {})})  # eager baseline
    clock = StepClock(warmup)
    pl.Trainer(accelerator=accelerator, devices=1, max_steps=steps + warmup, logger=False,
               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               limit_val_batches=0, gradient_clip_val=1.0, callbacks=[clock],
               **variant.get("trainer", {})).fit(module, data)
    return steps / clock.seconds


def measure(variants: list[str], sizes: dict, batch_size: int, steps: int, warmup: int, rounds: int,
            device: torch.device) -> dict:
    """Steps/s of each variant (best of `rounds`), the FLOPs of one step and the matmul peaks they are set against."""
    peaks = {torch.float32: matmul_peak(device, torch.float32), torch.bfloat16: matmul_peak(device, torch.bfloat16)}
    images = SyntheticShapes(num_train=batch_size, num_test=batch_size).dataset("train")
    batch = torch.stack([images[i][0] for i in range(batch_size)])
    flops = step_flops(PretrainModule(**sizes, compile=False), batch)
    # Round-robin over the variants, best rate of each kept: this machine's speed drifts by tens of percent
    # within minutes, and interleaving spreads that drift over every variant alike.
    rates = dict.fromkeys(variants, 0.0)
    for _ in range(rounds):
        for name in variants:
            rate = run(VARIANTS[name], sizes, batch_size, steps, warmup, "gpu" if device.type == "cuda" else "cpu")
            rates[name] = max(rates[name], rate)
    return {"rates": rates, "flops": flops, "peaks": peaks}


def report(m: dict) -> list[str]:
    """Each variant's rate, its ratio to the first and its share of the matmul peak of its precision."""
    baseline, lines = next(iter(m["rates"].values())), []
    for name, rate in m["rates"].items():
        bf16 = VARIANTS[name].get("trainer", {}).get("precision") == "bf16-mixed"
        fraction = m["flops"] * rate / m["peaks"][torch.bfloat16 if bf16 else torch.float32]
        lines.append(f"{name:30s} {rate:7.2f} steps/s  ratio {rate / baseline:5.2f}  "
                     f"{m['flops'] * rate / 1e9:8.1f} GFLOP/s = {fraction:.1%} of the {'bf16' if bf16 else 'fp32'} "
                     "matmul peak")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="model sizes (default: cifar10 on a GPU, fashion on a CPU)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens there)")
    parser.add_argument("--rounds", type=int, default=2, help="passes over all variants; the best rate is kept")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    preset = args.preset or ("cifar10" if cuda else "fashion")
    sizes, batch_size = PRESETS[preset]
    sizes = dict(sizes, image_channels=3, image_size=32)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"pretraining, {preset} preset sizes, batch {batch_size} of 3 x 32 x 32, {args.steps} timed steps "
          f"after {args.warmup}, best of {args.rounds} rounds, on {name}")
    measured = measure(args.variants, sizes, batch_size, args.steps, args.warmup, args.rounds, device)
    peaks = measured["peaks"]
    print(f"matmul peak: float32 {peaks[torch.float32] / 1e12:.2f} TFLOP/s, "
          f"bfloat16 {peaks[torch.bfloat16] / 1e12:.2f} TFLOP/s")
    print("\n".join(report(measured)))


if __name__ == "__main__":
    main()
