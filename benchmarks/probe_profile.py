"""Where a whole probe grid's time goes (#18): each kind's vectorised grid, every epoch and its evaluation, under
Lightning's SimpleProfiler; beside it the one-configuration-at-a-time protocol, split into training and
evaluation. Same data and sizes as benchmarks/probe_grid.py, both sides in this run.

    python benchmarks/probe_profile.py [--epochs 1] [--train 2304] [--kinds mlp gru transformer] [--top 12]
    python benchmarks/probe_profile.py --ops      # the operators of one training step and one evaluation batch
    python benchmarks/probe_profile.py --floor    # the matmul floor: what stacking members can gain at most
"""

import argparse
import tempfile
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.profilers import SimpleProfiler

import probe_grid  # benchmarks/probe_grid.py
from common import best_seconds
from probe_grid import SEEDS, gaussian_representations
from torch.utils.flop_counter import FlopCounterMode
from trajrep.data.representations import ProbeData
from trajrep.probe.kinds import default_options, kind_of
from trajrep.probe.module import PAPER_LEARNING_RATES, ProbeModule

# Each kind's largest matmul at the benchmark's sizes (batch 256, d = 32, 11 t + CLS, default widths), as
# (rows, inner, columns).
MAIN_MATMUL = {"mlp": (256, 32, 512), "gru": (256, 256, 768), "transformer": (256 * 12, 256, 768)}


def profiled_grid(kind: str, data: dict, epochs: int, times: list[float]) -> tuple[float, dict[str, float]]:
    """(wall seconds of fit, seconds per profiled action) of the vectorised grid."""
    probe_data = ProbeData.from_tensors(data, times, [10], SEEDS, task_names=["class"])
    with tempfile.TemporaryDirectory() as results_dir:
        profiler = SimpleProfiler(dirpath=results_dir, filename="profile")  # its own report: a file, not stdout
        module = ProbeModule(default_options(kind), seeds=SEEDS, num_classes=[10], task_names=["class"],
                             feature_dim=probe_data.feature_dim, times=times, results_dir=results_dir,
                             export_attention=False)
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             profiler=profiler)
        start = time.perf_counter()
        trainer.fit(module, probe_data)
        seconds = time.perf_counter() - start
    return seconds, {action: sum(durations) for action, durations in profiler.recorded_durations.items()}


def split_sequential(kind: str, data: dict, epochs: int) -> tuple[float, float]:
    """(wall seconds, of which evaluation) of the one-at-a-time protocol."""
    evaluation = [0.0]
    accuracy = probe_grid.accuracy

    def timed_accuracy(*args):
        start = time.perf_counter()
        result = accuracy(*args)
        evaluation[0] += time.perf_counter() - start
        return result

    probe_grid.accuracy = timed_accuracy
    try:
        start = time.perf_counter()
        probe_grid.sequential(kind, data, epochs)
        return time.perf_counter() - start, evaluation[0]
    finally:
        probe_grid.accuracy = accuracy


def operator_profile(kind: str, data: dict, times: list[float], top: int) -> None:
    """The operators of a training step (per-seed batches of 256, as in fit) and of an evaluation batch (the val
    split, 500 examples, as one batch) of the vectorised grid, by self CPU time; and the two wall times."""
    x, y = data["train"]
    module = ProbeModule(default_options(kind), seeds=SEEDS, num_classes=[10], feature_dim=x.shape[-1], times=times)
    optimizer = module.configure_optimizers()
    rows = torch.stack([torch.randperm(len(x), generator=torch.Generator().manual_seed(s))[:256] for s in SEEDS])
    batch_x, batch_y, (val_x, _) = x[rows], y[rows], data["val"]

    def train_step():
        module.grid_step(batch_x, batch_y, optimizer, lambda loss: loss.backward())

    @torch.no_grad()
    def evaluation_batch():
        module.eval()
        module(val_x).argmax(dim=-1)
        module.train()

    for name, step in (("training step", train_step), ("evaluation batch", evaluation_batch)):
        step()  # warm-up
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            step()
        print(f"\n{kind} {name}: {seconds * 1e3:.0f} ms")
        print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40))


def matmul_rate(shape: tuple[int, int, int], members: int) -> float:
    """FLOP/s of `members` stacked matmuls of one shape (a batched matmul with a bias, as the grids run them)."""
    rows, inner, columns = shape
    x, w, b = torch.randn(members, rows, inner), torch.randn(members, inner, columns), torch.randn(members, 1, columns)
    torch.baddbmm(b, x, w)  # warm-up
    return 2 * members * rows * inner * columns / best_seconds(lambda: torch.baddbmm(b, x, w), repeats=5)


def sequential_flops(kind: str, data: dict, epochs: int) -> float:
    """All the arithmetic of the one-at-a-time protocol: every configuration's training steps and evaluations."""
    (x, y), dim, num_times = data["train"], data["train"][0].shape[-1], data["train"][0].shape[1]
    model = {"mlp": lambda: probe_grid.PlainMLP(dim, 10), "gru": lambda: probe_grid.PlainGRU(dim, 10),
             "transformer": lambda: probe_grid.PlainTransformer(dim, 10, num_times)}[kind]()
    batch = x[:256, 0] if kind == "mlp" else x[:256]
    with FlopCounterMode(display=False) as step:
        torch.nn.functional.cross_entropy(model(batch), y[:256]).backward()
    with FlopCounterMode(display=False) as evaluation, torch.no_grad():
        model.eval()(batch)
    steps = epochs * -(-len(y) // 256)
    rows = epochs * (len(data["val"][1]) + len(data["test"][1]))
    configurations = len(PAPER_LEARNING_RATES) * len(SEEDS) * (num_times if kind == "mlp" else 1)
    return configurations * (steps * step.get_total_flops() + rows / 256 * evaluation.get_total_flops())


def matmul_floor(kind: str, data: dict, epochs: int) -> None:
    """What stacking members can gain at most: the sequential protocol's arithmetic at the rate that ONE member's
    main matmul already reaches, against the protocol's measured time; and the rate of a whole chunk's."""
    plain, _ = split_sequential(kind, data, epochs)
    flops = sequential_flops(kind, data, epochs)
    one, chunk = matmul_rate(MAIN_MATMUL[kind], 1), matmul_rate(MAIN_MATMUL[kind], kind_of(kind).cpu_chunk)
    floor = flops / max(one, chunk)
    print(f"{kind}: main matmul {' x '.join(map(str, MAIN_MATMUL[kind]))}: one member {one / 1e9:.0f} GFLOP/s, a "
          f"chunk of {kind_of(kind).cpu_chunk} {chunk / 1e9:.0f} GFLOP/s; the sequential side's "
          f"{flops / 1e12:.2f} TFLOP (training and evaluation) take {floor:.1f} s at the faster rate, its run "
          f"{plain:.1f} s: no grid can be more than {plain / floor:.2f}x faster with these matmuls")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--kinds", nargs="+", default=["mlp", "gru", "transformer"])
    parser.add_argument("--times", type=int, default=11)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--train", type=int, default=2304, help="training representations")
    parser.add_argument("--top", type=int, default=12, help="profiled actions shown per kind")
    parser.add_argument("--ops", action="store_true", help="profile the operators of one step instead")
    parser.add_argument("--floor", action="store_true", help="the most that stacking members can gain")
    args = parser.parse_args()
    times = [i / (args.times - 1) for i in range(args.times)]
    data = gaussian_representations(args.times, args.dim, 10, {"train": args.train, "val": 500, "test": 2000})
    print(f"{args.epochs} epoch(s), {args.train} train / 500 val / 2000 test, d = {args.dim}, {args.times} t, "
          f"threads {torch.get_num_threads()}")
    for kind in args.kinds:
        if args.ops:
            operator_profile(kind, data, times, args.top)
            continue
        if args.floor:
            matmul_floor(kind, data, args.epochs)
            continue
        seconds, actions = profiled_grid(kind, data, args.epochs, times)
        plain, plain_evaluation = split_sequential(kind, data, args.epochs)
        print(f"\n{kind}: vectorised fit {seconds:.1f} s; sequential {plain:.1f} s, of which evaluation "
              f"{plain_evaluation:.1f} s ({plain_evaluation / plain:.0%}); ratio {plain / seconds:.2f}")
        for action, total in sorted(actions.items(), key=lambda item: -item[1])[:args.top]:
            print(f"  {total:8.2f} s  {total / seconds:5.1%}  {action}")


if __name__ == "__main__":
    main()
