"""Extraction through the cache vs recomputing every paper grid one t at a time.

The paper probes 8 granularities g in {2, 5, 7, 10, 17, 25, 37, 50}: 161 grid points, 109 distinct t. trajrep
extracts the union once, the (image, t) pairs of a batch in passes of `--pass-size` encoder inputs, and writes it
to disk; the baseline recomputes each grid separately, one encoder pass per t, and writes nothing. Both use the
same encoder and images in this run; the encoder's plain forward throughput at the pass size is measured too.

    python benchmarks/extract.py [--images 256] [--batch-size 64] [--widen-factor 0.5] [--depth 16] [--pass-size 64]
"""

import argparse
import tempfile

import lightning.pytorch as pl
import torch

from trajrep.data.synthetic import SyntheticShapes
from trajrep.extract import CPU_PASS_SIZE, extract_representations
from trajrep.pretrain.module import PretrainModule
from trajrep.timegrid import build_time_grid

from common import best_seconds  # benchmarks/common.py

PAPER_GRANULARITIES = [2, 5, 7, 10, 17, 25, 37, 50]


def measure(images: int = 256, batch_size: int = 64, depth: int = 16, widen_factor: float = 0.5,
            pass_size: int = CPU_PASS_SIZE, repeats: int = 2, device: torch.device = torch.device("cpu")) -> dict:
    """Rates of the encoder's plain forward, of recomputing every grid per t and of extraction through the cache,
    on `images` test images of the generated shapes."""
    torch.manual_seed(0)
    data = SyntheticShapes(num_train=5760 - images, num_test=images)
    model = PretrainModule(image_channels=3, image_size=32, encoder_depth=depth, widen_factor=widen_factor,
                           nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=()).eval().to(device)
    encoder, sde = model.encoder, model.sde
    x0 = data.normalize(torch.stack([data.dataset("test")[i][0] for i in range(images)])).to(device)
    grids = [build_time_grid(granularities=[g]) for g in PAPER_GRANULARITIES]
    union = build_time_grid(granularities=PAPER_GRANULARITIES)
    points = sum(len(grid) for grid in grids)
    cache_batch = max(1, batch_size // 8)
    forward_size = min(pass_size, cache_batch * len(union))  # encoder inputs per pass through the cache

    @torch.no_grad()
    def encoder_forward():
        """Plain forward passes of the same size as extraction's, no data handling or writing."""
        inputs = x0.repeat(-(-forward_size // len(x0)), 1, 1, 1)[:forward_size]  # real, contiguous images
        encoder.representation(inputs, sde.log_sigma(torch.full((forward_size,), 0.5, device=device)))

    @torch.no_grad()
    def recompute_every_grid():
        for grid in grids:
            for t in grid:
                for start in range(0, images, batch_size):
                    batch = x0[start:start + batch_size]
                    encoder.representation(batch, sde.log_sigma(torch.full((len(batch),), t, device=device)))

    def through_cache():
        with tempfile.TemporaryDirectory() as cache_dir:
            trainer = pl.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, logger=False,
                                 enable_progress_bar=False, enable_model_summary=False)
            extract_representations(trainer, model, data, union, ema=False, dtype="float32", cache_dir=cache_dir,
                                    splits=("test",), batch_size=cache_batch, pass_size=pass_size)

    encoder_forward()  # warm-up
    forward_rate = forward_size / best_seconds(encoder_forward, device=device)
    # Alternate the two sides and keep the best of each: this machine's speed drifts within minutes.
    recompute_seconds, cache_seconds = float("inf"), float("inf")
    for _ in range(repeats):
        recompute_seconds = min(recompute_seconds, best_seconds(recompute_every_grid, repeats=1, device=device))
        cache_seconds = min(cache_seconds, best_seconds(through_cache, repeats=1, device=device))
    return {"encoder": f"WRN-{depth}-{widen_factor:g}", "latent_dim": model.latent_dim, "images": images,
            "grids": len(grids), "points": points, "distinct_times": len(union), "pass_size": forward_size,
            "forward_rate": forward_rate, "recompute_seconds": recompute_seconds, "cache_seconds": cache_seconds,
            "recompute_rate": images * points / recompute_seconds, "cache_rate": images * points / cache_seconds,
            "cache_encoder_rate": images * len(union) / cache_seconds}


def report(m: dict) -> list[str]:
    """The measurements as the lines this benchmark prints."""
    return [
        f"encoder {m['encoder']} (d_z = {m['latent_dim']}), {m['images']} images, {m['grids']} grids: "
        f"{m['points']} grid points, {m['distinct_times']} distinct t",
        f"encoder forward alone:       {m['forward_rate']:10.0f} images x t / s ({m['pass_size']} inputs per pass, "
        "best of 3)",
        f"recompute each grid, per t:  {m['recompute_rate']:10.0f} grid points / s ({m['recompute_seconds']:.1f} s)",
        f"through the cache:           {m['cache_rate']:10.0f} grid points / s ({m['cache_seconds']:.1f} s, "
        f"{m['cache_encoder_rate']:.0f} encoder images x t / s = {m['cache_encoder_rate'] / m['forward_rate']:.0%} "
        "of the forward throughput)",
        f"ratio cache / recompute: {m['cache_rate'] / m['recompute_rate']:.2f} (bound from shared points: "
        f"{m['points'] / m['distinct_times']:.2f})",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="test images to encode")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (both methods)")
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--widen-factor", type=float, default=0.5)
    parser.add_argument("--pass-size", type=int, default=CPU_PASS_SIZE, help="encoder inputs per pass when extracting")
    parser.add_argument("--repeats", type=int, default=2, help="alternating timings of each side (best kept)")
    args = parser.parse_args()
    print(f"threads {torch.get_num_threads()}")
    print("\n".join(report(measure(args.images, args.batch_size, args.depth, args.widen_factor, args.pass_size,
                                    args.repeats))))


if __name__ == "__main__":
    main()
