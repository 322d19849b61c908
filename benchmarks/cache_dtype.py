"""Representation cache in float16 vs float32: bytes on disk, and the probe accuracy each gives on the same data.

Pretrains a small model briefly on the synthetic shapes (4 tasks), extracts the same grid in both dtypes, and
trains the same single-t MLP grid on each.

    python benchmarks/cache_dtype.py [--pretrain-steps 60] [--epochs 5]
"""

import argparse
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import numpy as np

from trajrep.data.representations import RepresentationDataModule
from trajrep.data.synthetic import SyntheticShapes
from trajrep.extract import build_cache
from trajrep.pretrain.module import PretrainModule
from trajrep.nn.probes import MLPOptions
from trajrep.probe.module import ProbeModule

QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def images() -> SyntheticShapes:
    return SyntheticShapes(num_train=2000, num_test=1000, batch_size=32)


def pretrain(steps: int, path: Path) -> None:
    pl.seed_everything(0)
    module = PretrainModule(encoder_depth=10, widen_factor=0.5, nf=8, ch_mult=(1, 2), num_res_blocks=1,
                            attn_resolutions=(), lr=1e-3, warmup_steps=10)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, limit_val_batches=0, **QUIET)
    trainer.fit(module, images())
    trainer.save_checkpoint(path)


def probe(checkpoint: Path, dtype: str, cache_dir: Path, epochs: int) -> tuple[int, list[dict]]:
    """(bytes of the cache's arrays, the MLP grid's member records) for one cache dtype."""
    data = RepresentationDataModule(str(checkpoint), images(), granularities=[10], dtype=dtype,
                                    cache_dir=str(cache_dir), seeds=[0, 1, 2])
    build_cache(data)
    size = sum(path.stat().st_size for path in data.cache_path.glob("**/*.npy"))
    pl.seed_everything(0)
    module = ProbeModule(MLPOptions(), learning_rates=[1e-3], seeds=data.seeds, num_classes=data.num_classes,
                         task_names=data.task_names, feature_dim=data.feature_dim, times=data.times,
                         results_dir=str(cache_dir / "results"))
    pl.Trainer(accelerator="cpu", max_epochs=epochs, **QUIET).fit(module, datamodule=data)
    return size, module.member_records()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        pretrain(args.pretrain_steps, folder / "model.ckpt")
        (size16, records16), (size32, records32) = (probe(folder / "model.ckpt", dtype, folder, args.epochs)
                                                    for dtype in ("float16", "float32"))
    acc16, acc32 = (np.array([r["test_acc"] for r in records]) for records in (records16, records32))
    print(f"cache arrays: float16 {size16 / 2 ** 20:.2f} MiB, float32 {size32 / 2 ** 20:.2f} MiB, "
          f"size ratio {size16 / size32:.3f}")
    print(f"single-t MLP, {len(acc16)} members (4 tasks x 11 t x 3 seeds), {args.epochs} epochs: mean test accuracy "
          f"float16 {100 * acc16.mean():.2f} vs float32 {100 * acc32.mean():.2f} (difference "
          f"{100 * (acc16.mean() - acc32.mean()):+.2f} points; largest member difference "
          f"{100 * np.abs(acc16 - acc32).max():.2f} points)")


if __name__ == "__main__":
    main()
