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
from trajrep.pretrain import PretrainModule
from trajrep.timegrid import build_time_grid

from common import best_seconds  # benchmarks/common.py

PAPER_GRANULARITIES = [2, 5, 7, 10, 17, 25, 37, 50]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="test images to encode")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (both methods)")
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--widen-factor", type=float, default=0.5)
    parser.add_argument("--pass-size", type=int, default=CPU_PASS_SIZE, help="encoder inputs per pass when extracting")
    parser.add_argument("--repeats", type=int, default=2, help="alternating timings of each side (best kept)")
    args = parser.parse_args()
    torch.manual_seed(0)

    images = SyntheticShapes(num_train=5760 - args.images, num_test=args.images)
    model = PretrainModule(image_channels=3, image_size=32, encoder_depth=args.depth, widen_factor=args.widen_factor,
                           nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=()).eval()
    encoder, sde = model.encoder, model.sde
    x0 = images.normalize(torch.stack([images.dataset("test")[i][0] for i in range(args.images)]))
    grids = [build_time_grid(granularities=[g]) for g in PAPER_GRANULARITIES]
    union = build_time_grid(granularities=PAPER_GRANULARITIES)
    points = sum(len(grid) for grid in grids)
    print(f"encoder WRN-{args.depth}-{args.widen_factor} (d_z = {model.latent_dim}), {args.images} images, "
          f"{len(grids)} grids: {points} grid points, {len(union)} distinct t, threads {torch.get_num_threads()}")

    cache_batch = max(1, args.batch_size // 8)
    pass_size = min(args.pass_size, cache_batch * len(union))  # encoder inputs per pass through the cache

    @torch.no_grad()
    def encoder_forward():
        """Plain forward passes of the same size as extraction's, no data handling or writing."""
        inputs = x0.repeat(-(-pass_size // len(x0)), 1, 1, 1)[:pass_size]  # real, contiguous images
        encoder.representation(inputs, sde.log_sigma(torch.full((pass_size,), 0.5)))

    @torch.no_grad()
    def recompute_every_grid():
        for grid in grids:
            for t in grid:
                for start in range(0, args.images, args.batch_size):
                    batch = x0[start:start + args.batch_size]
                    encoder.representation(batch, sde.log_sigma(torch.full((len(batch),), t)))

    def through_cache():
        with tempfile.TemporaryDirectory() as cache_dir:
            trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                                 enable_model_summary=False)
            extract_representations(trainer, model, images, union, ema=False, dtype="float32", cache_dir=cache_dir,
                                    splits=("test",), batch_size=cache_batch, pass_size=args.pass_size)

    encoder_forward()  # warm-up
    forward_rate = pass_size / best_seconds(encoder_forward)
    # Alternate the two sides and keep the best of each: this machine's speed drifts within minutes.
    recompute_seconds, cache_seconds = float("inf"), float("inf")
    for _ in range(args.repeats):
        recompute_seconds = min(recompute_seconds, best_seconds(recompute_every_grid, repeats=1))
        cache_seconds = min(cache_seconds, best_seconds(through_cache, repeats=1))

    recompute_rate = args.images * points / recompute_seconds
    cache_rate = args.images * points / cache_seconds
    print(f"encoder forward alone:       {forward_rate:10.0f} images x t / s ({pass_size} inputs per pass, best of 3)")
    print(f"recompute each grid, per t:  {recompute_rate:10.0f} grid points / s ({recompute_seconds:.1f} s)")
    print(f"through the cache:           {cache_rate:10.0f} grid points / s ({cache_seconds:.1f} s, "
          f"{args.images * len(union) / cache_seconds:.0f} encoder images x t / s = "
          f"{args.images * len(union) / cache_seconds / forward_rate:.0%} of the forward throughput)")
    print(f"ratio cache / recompute: {cache_rate / recompute_rate:.2f} (bound from shared points: "
          f"{points / len(union):.2f})")


if __name__ == "__main__":
    main()
