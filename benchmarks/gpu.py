"""The prepared GPU check: the paper preset's pretraining fast paths, extraction of the 8 paper grids and the probe
grids against the one-at-a-time protocol, on one GPU, written into benchmarks/RESULTS.md.

Each part measures its baseline in the same run (benchmarks/pretrain.py, extract.py, probe_grid.py, whose
functions it calls with GPU sizes). The section between the markers in RESULTS.md is replaced with the figures,
the date, the GPU and the command. Sized to finish in under 8 minutes on one H200-class GPU.

    python benchmarks/gpu.py              (make bench-gpu)
    python benchmarks/gpu.py --dry-run    (tiny sizes on whatever device there is, printed: checks the script)
"""

import argparse
import datetime
import shlex
import sys
import time
from pathlib import Path

import torch

import extract
import pretrain
import probe_grid
from common import matmul_peak  # benchmarks/common.py

BEGIN = "<!-- bench-gpu: written by benchmarks/gpu.py, replaced at every run -->"
END = "<!-- /bench-gpu -->"
PRETRAIN_VARIANTS = ["fp32 eager", "bf16-mixed", "compile", "channels_last", "device_resident data", "all together"]
TINY_MODEL = dict(encoder_depth=10, widen_factor=0.25, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                  image_channels=3, image_size=32)


def pretraining(device: torch.device, dry_run: bool) -> list[str]:
    if dry_run:  # compiling takes minutes on a CPU, so the compiled variants are left to the real run
        variants = [name for name in PRETRAIN_VARIANTS if "compile" not in pretrain.VARIANTS[name].get("model", {})]
        measured = pretrain.measure(variants, TINY_MODEL, 4, steps=1, warmup=1, rounds=1, device=device)
        title = "tiny model, batch 4, 1 timed step"
    else:
        sizes, batch_size = pretrain.PRESETS["cifar10"]
        measured = pretrain.measure(PRETRAIN_VARIANTS, dict(sizes, image_channels=3, image_size=32), batch_size,
                                    steps=10, warmup=3, rounds=1, device=device)
        title = f"CIFAR-10 preset sizes, batch {batch_size}, 10 timed steps after 3"
    peaks = measured["peaks"]
    return [f"Pretraining ({title}); matmul peak float32 {peaks[torch.float32] / 1e12:.1f} TFLOP/s, bfloat16 "
            f"{peaks[torch.bfloat16] / 1e12:.1f} TFLOP/s:", "", *pretrain.report(measured)]


def extraction(device: torch.device, dry_run: bool) -> list[str]:
    if dry_run:
        measured = extract.measure(images=16, batch_size=16, depth=10, widen_factor=0.25, repeats=1, device=device)
    else:  # the paper preset's encoder, WRN-28-2
        measured = extract.measure(images=2000, batch_size=500, depth=28, widen_factor=2, pass_size=1000, repeats=2,
                                   device=device)
    return ["Extraction of the 8 paper grids:", "", *extract.report(measured)]


def probe_grids(device: torch.device, dry_run: bool) -> list[str]:
    train, evaluated, dim, epochs, times = (128, 64, 8, 1, 2) if dry_run else (4500, 2000, 32, 2, 11)
    data = probe_grid.gaussian_representations(times, dim, 10, {"train": train, "val": evaluated // 4,
                                                                "test": evaluated})
    grid = [i / (times - 1) for i in range(times)]
    peak = matmul_peak(device)
    lines = [f"Probe grids (6 lr x 5 seeds, {times} t, d = {dim}, {epochs} epochs of {train}; the default chunks of "
             f"the device); matmul peak float32 {peak / 1e12:.1f} TFLOP/s:", ""]
    for kind in ("mlp", "gru", "transformer"):
        lines += probe_grid.report(probe_grid.compare(kind, data, epochs, grid, None, peak, device))
    return lines


def write_section(results: Path, lines: list[str]) -> None:
    """Replace the section between BEGIN and END in `results` (appended the first time)."""
    text = results.read_text() if results.exists() else ""
    section = "\n".join([BEGIN, *lines, END])
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section + "\n"
    results.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes; runs on a CPU in seconds")
    parser.add_argument("--results", type=Path, default=None,
                        help="the file whose section to rewrite (default: benchmarks/RESULTS.md; a dry run only "
                             "prints unless given one)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        sys.exit("benchmarks/gpu.py needs a CUDA GPU (use --dry-run to check the script on a CPU)")
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    start = time.perf_counter()
    parts = [part(device, args.dry_run) for part in (pretraining, extraction, probe_grids)]
    command = "python benchmarks/gpu.py" + (" --dry-run" if args.dry_run else "")
    lines = [f"## GPU check{' (dry run, tiny sizes)' if args.dry_run else ''}",
             f"`{command}` on {name}, {datetime.date.today().isoformat()}, torch {torch.__version__}, "
             f"{time.perf_counter() - start:.0f} s in all.", ""]
    for part in parts:
        lines += ["```", *part, "```", ""]
    print("\n".join(lines))
    results = args.results or (None if args.dry_run else Path(__file__).parent / "RESULTS.md")
    if results is not None:
        write_section(results, lines[:-1])
        print(f"written into {results} ({shlex.quote(command)})")


if __name__ == "__main__":
    main()
