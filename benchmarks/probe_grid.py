"""The probe grid (6 learning rates x 5 seeds; x every t for the MLP) vectorised vs one configuration at a time.

Vectorised: trajrep's ProbeModule, the whole grid as one model, through Lightning. Sequential: the original
protocol done plainly, one model, optimizer and shuffled DataLoader per configuration, pure PyTorch. Same data
(class-dependent Gaussian representations, generated here), same epochs, same selection (trajrep.probe.selection),
both in this run. Also measures a matmul peak, the FLOP/s of each vectorised training step, and
the ceiling on the ratio that the sequential side's own FLOP rate implies.

    python benchmarks/probe_grid.py [--epochs 3] [--kinds mlp gru transformer] [--member-chunk N]
    python benchmarks/probe_grid.py --chunks     # step time against the members per chunk
"""

import argparse
import math
import tempfile
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from trajrep.data.representations import ProbeData
from trajrep.nn.probes import sinusoidal_encoding
from trajrep.probe.kinds import default_options, kind_of
from trajrep.probe.module import PAPER_LEARNING_RATES, ProbeModule
from trajrep.probe.selection import best_epochs, summarise

from common import best_seconds, matmul_peak  # benchmarks/common.py

SEEDS = [0, 1, 2, 3, 4]


def gaussian_representations(num_times: int, dim: int, classes: int, sizes: dict[str, int]) -> dict:
    """x[n, t] = s_t * mean[y_n, t] + noise, with the signal s_t growing over t: every t is informative."""
    generator = torch.Generator().manual_seed(0)
    means = torch.randn(classes, num_times, dim, generator=generator)
    signal = torch.linspace(0.15, 0.35, num_times)[None, :, None]
    data = {}
    for stage, size in sizes.items():
        y = torch.randint(0, classes, (size,), generator=generator)
        data[stage] = (signal * means[y] + torch.randn(size, num_times, dim, generator=generator), y)
    return data


class PlainMLP(nn.Sequential):
    def __init__(self, dim: int, classes: int) -> None:
        super().__init__(nn.Linear(dim, 512), nn.ReLU(), nn.Dropout(0.25), nn.Linear(512, classes))


class PlainGRU(nn.Module):
    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.cell, self.dropout, self.out = nn.GRUCell(dim, 256), nn.Dropout(0.25), nn.Linear(256, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], 256)
        for i in range(x.shape[1]):
            h = self.dropout(self.cell(x[:, i], h))
        return self.out(h)


class PlainTransformer(nn.Module):
    def __init__(self, dim: int, classes: int, num_times: int) -> None:
        super().__init__()
        self.proj, self.dropout = nn.Linear(dim, 256), nn.Dropout(0.25)
        self.register_buffer("position", sinusoidal_encoding(num_times, 256))
        self.cls = nn.Parameter(torch.empty(1, 1, 256).uniform_(-math.sqrt(6 / 512), math.sqrt(6 / 512)))
        self.block = nn.TransformerEncoderLayer(256, 4, 512, dropout=0.25, batch_first=True)
        self.out = nn.Linear(256, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.dropout(self.proj(x)) + self.position, self.cls.expand(x.shape[0], -1, -1)], dim=1)
        return self.out(self.block(self.block(h))[:, -1])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        correct = sum((model(xb.to(device)).argmax(-1).cpu() == yb).sum().item()
                      for xb, yb in zip(x.split(1024), y.split(1024)))
    model.train()
    return correct / len(y)


def sequential(kind: str, data: dict, epochs: int, device: torch.device = torch.device("cpu")) -> list[dict]:
    """One plain run per configuration (per t for the MLP), as the original scripts do: batches from a CPU
    DataLoader, moved to `device`."""
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = data["train"], data["val"], data["test"]
    num_times, dim, classes = x_train.shape[1], x_train.shape[2], int(y_train.max()) + 1
    records = []
    for time_index in range(num_times) if kind == "mlp" else [None]:
        def view(x):
            return x if time_index is None else x[:, time_index]
        for lr in PAPER_LEARNING_RATES:
            for seed in SEEDS:
                torch.manual_seed(seed)
                model = {"mlp": lambda: PlainMLP(dim, classes), "gru": lambda: PlainGRU(dim, classes),
                         "transformer": lambda: PlainTransformer(dim, classes, num_times)}[kind]().to(device)
                optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-5)
                loader = DataLoader(TensorDataset(view(x_train), y_train), batch_size=256, shuffle=True,
                                    generator=torch.Generator().manual_seed(seed))
                val_history, test_history = [], []
                for _ in range(epochs):
                    for xb, yb in loader:
                        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                        optimizer.zero_grad()
                        F.cross_entropy(model(xb), yb).backward()
                        if kind_of(kind).mixer:
                            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                        optimizer.step()
                    val_history.append([accuracy(model, view(x_val), y_val)])
                    test_history.append([accuracy(model, view(x_test), y_test)])
                epoch, val, test = best_epochs(torch.tensor(val_history).numpy(), torch.tensor(test_history).numpy())
                records.append({"task": "class", "lr": lr, "seed": seed, "val_acc": float(val[0]),
                                "test_acc": float(test[0]),
                                "time": None if time_index is None else float(time_index)})
    return records


def vectorised(kind: str, data: dict, epochs: int, times: list[float], member_chunk: int | None,
               accelerator: str = "cpu") -> list[dict]:
    probe_data = ProbeData.from_tensors(data, times, [10], SEEDS, task_names=["class"])
    with tempfile.TemporaryDirectory() as results_dir:
        module = ProbeModule(default_options(kind), seeds=SEEDS, num_classes=[10], task_names=["class"],
                             feature_dim=probe_data.feature_dim, times=times, results_dir=results_dir,
                             member_chunk=member_chunk, export_attention=False)  # work the sequential side skips
        pl.Trainer(max_epochs=epochs, accelerator=accelerator, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0).fit(module, probe_data)
    records = module.member_records()
    for record in records:  # index times like the sequential side, for the comparison below
        record["time"] = None if record["time"] is None else float(times.index(record["time"]))
    return records


def training_step(kind: str, data: dict, times: list[float], member_chunk: int | None, repeats: int = 2,
                  device: torch.device = torch.device("cpu")) -> tuple[float, float]:
    """(FLOPs, best seconds) of one training step of the vectorised grid (forward, backward, clip, Adam)."""
    module = ProbeModule(default_options(kind), seeds=SEEDS, num_classes=[10],
                         feature_dim=data["train"][0].shape[-1], times=times, member_chunk=member_chunk).to(device)
    optimizer = module.configure_optimizers()
    x = data["train"][0][:256].unsqueeze(0).expand(len(SEEDS), -1, -1, -1).contiguous().to(device)
    y = data["train"][1][:256].unsqueeze(0).expand(len(SEEDS), -1).contiguous().to(device)

    def step():
        module.grid_step(x, y, optimizer, lambda loss: loss.backward())

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops(), best_seconds(step, repeats, device=device)


def chunk_sweep(kinds: list[str], data: dict, times: list[float]) -> None:
    """Training-step time of each kind's grid against the members per chunk (for its cpu_chunk in
    trajrep.probe.kinds)."""
    for kind in kinds:
        members = len(PAPER_LEARNING_RATES) * len(SEEDS) * (len(times) if kind == "mlp" else 1)
        for chunk in sorted({members, 64, 32, 16, 10, 6, 3} - {c for c in (64, 32, 16) if c >= members}):
            flops, seconds = training_step(kind, data, times, chunk)
            print(f"{kind:12s} member_chunk {chunk:4d}: step {seconds * 1e3:8.1f} ms, "
                  f"{flops / seconds / 1e9:6.1f} GFLOP/s")


def compare(kind: str, data: dict, epochs: int, times: list[float], member_chunk: int | None, peak: float,
            device: torch.device = torch.device("cpu")) -> dict:
    """Both sides of one kind's grid, whole (evaluation included), and the vectorised training step's FLOP rate."""
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    start = time.perf_counter()
    fast = summarise(vectorised(kind, data, epochs, times, member_chunk, accelerator))["class"]
    fast_seconds = time.perf_counter() - start
    start = time.perf_counter()
    plain = summarise(sequential(kind, data, epochs, device))["class"]
    plain_seconds = time.perf_counter() - start
    flops, step_seconds = training_step(kind, data, times, member_chunk, device=device)
    return {"kind": kind, "fast_seconds": fast_seconds, "plain_seconds": plain_seconds, "fast": fast, "plain": plain,
            "step_flops": flops, "step_seconds": step_seconds, "peak": peak,
            "steps": epochs * math.ceil(len(data["train"][1]) / 256)}


def report(m: dict) -> list[str]:
    """The comparison as the lines this benchmark prints."""
    fast, plain, kind = m["fast"], m["plain"], m["kind"]
    gap = 100 * abs(fast["test_acc_mean"] - plain["test_acc_mean"])
    rate = m["step_flops"] / m["step_seconds"]
    # Both sides do the same training arithmetic; at the peak it would take steps * flops / peak seconds.
    return [
        f"{kind:12s} vectorised {m['fast_seconds']:7.1f} s  sequential {m['plain_seconds']:7.1f} s  "
        f"ratio {m['plain_seconds'] / m['fast_seconds']:5.2f}  | selected lr {fast['lr']:g} vs {plain['lr']:g} "
        f"({'same' if fast['lr'] == plain['lr'] else 'DIFFERENT'}), test acc {100 * fast['test_acc_mean']:.2f} vs "
        f"{100 * plain['test_acc_mean']:.2f} ({'within' if gap <= 0.3 else 'OUTSIDE'} 0.3 points)",
        f"{kind:12s} training step {rate / 1e9:.1f} GFLOP/s = {rate / m['peak']:.0%} of peak; the sequential side "
        f"trains at {m['steps'] * m['step_flops'] / m['plain_seconds'] / 1e9:.1f} GFLOP/s (evaluation included), "
        f"so no implementation can exceed ratio "
        f"{m['plain_seconds'] * m['peak'] / (m['steps'] * m['step_flops']):.1f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--kinds", nargs="+", default=["mlp", "gru", "transformer"])
    parser.add_argument("--times", type=int, default=11)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--train", type=int, default=4500, help="training representations")
    parser.add_argument("--member-chunk", type=int, default=None,
                        help="default: the kind's cpu_chunk (trajrep.probe.kinds)")
    parser.add_argument("--chunks", action="store_true", help="only sweep the members per chunk")
    args = parser.parse_args()
    times = [i / (args.times - 1) for i in range(args.times)]
    sizes = {"train": args.train, "val": 500, "test": 2000}
    data = gaussian_representations(args.times, args.dim, 10, sizes)
    print(f"grid {len(PAPER_LEARNING_RATES)} lr x {len(SEEDS)} seeds, {args.times} t, d = {args.dim}, "
          f"{args.epochs} epochs, {args.train} train / 500 val / 2000 test, threads {torch.get_num_threads()}")
    peak = matmul_peak()
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s (2048 x 2048 float32)")
    if args.chunks:
        return chunk_sweep(args.kinds, data, times)
    for kind in args.kinds:
        print("\n".join(report(compare(kind, data, args.epochs, times, args.member_chunk, peak))))


if __name__ == "__main__":
    main()
