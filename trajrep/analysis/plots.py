"""Every figure of the report and the analyses; the only module that imports matplotlib."""

import math
from pathlib import Path

import matplotlib
import numpy as np
import torch

from trajrep.analysis.collect import Collected, columns, mean_std, mixer_columns, row_order
from trajrep.diffusion import VESDE

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


TIME_LABEL = "t (0 = clean, 1 = most noise)"


def time_axes(ax: plt.Axes, sde: dict | None) -> None:
    """t along the bottom and, where the records name the noise process, sigma(t) along the top at the same
    positions (sigma grows geometrically in t, so the top ticks are labelled, not spaced, by sigma)."""
    ax.set_xlabel(TIME_LABEL)
    if sde is None:
        return
    ticks = [0.0, 0.25, 0.5, 0.75, 1.0]
    sigmas = VESDE(sde["sigma_min"], sde["sigma_max"]).sigma(torch.tensor(ticks, dtype=torch.float64)).tolist()
    top = ax.secondary_xaxis("top")
    top.set_xticks(ticks, labels=[f"{sigma:.2g}" for sigma in sigmas], fontsize=7)
    top.set_xlabel("noise scale sigma(t)", fontsize=8)


def panel_title(row: tuple) -> str:
    """Two short lines for a figure panel: dataset and encoder, then latent size, steps, grid (and task)."""
    dataset, encoder, latent_dim, steps, grid, *task = row
    times = f"g = {grid}" if isinstance(grid, int) else grid
    return f"{dataset}: {encoder}\nd_z = {latent_dim}, {steps} steps, {times}" + "".join(f", {t}" for t in task)


def shared_legend(figure: plt.Figure, axes: list[plt.Axes], title: str) -> None:
    """One legend for every panel, below them, so that none covers data; then the final layout."""
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    figure.tight_layout(rect=(0, 0.8 / figure.get_figheight(), 1, 1))  # 0.8 inch for the legend
    figure.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(handles), 6), fontsize=8,
                  title=title, title_fontsize=8)


def panels(keys: list[tuple]) -> tuple[plt.Figure, list[plt.Axes]]:
    columns = min(len(keys), 4)
    rows = math.ceil(len(keys) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    return figure, list(axes.flat)


def plot_accuracy_vs_t(collected: Collected, path: Path) -> None:
    """MLP test accuracy at every t (mean ± std over pretraining seeds), mixers as horizontal lines."""
    keys = [row for row in sorted(collected.per_time, key=row_order)
            if len(collected.per_time[row]) > 1]  # not the pixel control's single "time"
    if not keys:
        return
    figure, axes = panels(keys)
    for ax, row in zip(axes, keys):
        times = sorted(collected.per_time[row])
        stats_at = [mean_std(list(collected.per_time[row][t].values())) for t in times]
        means = 100 * np.array([mean for mean, _ in stats_at])
        stds = 100 * np.array([std or 0.0 for _, std in stats_at])
        ax.plot(times, means, "o-", color="black", label="MLP at t")
        ax.fill_between(times, means - stds, means + stds, color="black", alpha=0.15)
        references = (*mixer_columns(), "concat", "transformer-replicated")  # each keeps its colour in every panel
        for column, colour in zip(references, plt.get_cmap("tab10").colors):
            if not collected.cells[row].get(column):
                continue
            ax.axhline(100 * np.mean(list(collected.cells[row][column].values())), color=colour, ls="--",
                       label=columns()[column])
        ax.set_ylabel("test accuracy (%)")
        ax.ticklabel_format(axis="y", useOffset=False)  # 99.99 %, not 0.00 + 9.999e1
        time_axes(ax, collected.sde.get(row))
        ax.set_title(panel_title(row), fontsize=9)
    shared_legend(figure, axes, "MLP at each t (band: ± std over pretraining seeds); dashed: probes over all t")
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_linear_over_layers(collected: Collected, path: Path) -> None:
    """Denoiser features: the linear probe's test accuracy at every (block, t), mean over pretraining seeds, one
    heat map per encoder row (blocks in the order the backbone computes them)."""
    keys = sorted(collected.layer_grid, key=row_order)
    if not keys:
        return
    figure, axes = panels(keys)
    for ax, row in zip(axes, keys):
        grid = collected.layer_grid[row]
        layers = [b for b in collected.blocks[row] if any(layer == b for layer, _ in grid)]
        layers += sorted({layer for layer, _ in grid} - set(layers))
        times = sorted({time for _, time in grid})
        accuracy = 100 * np.array([[np.mean(list(grid[(layer, time)].values())) if (layer, time) in grid else np.nan
                                    for time in times] for layer in layers])
        image = ax.imshow(accuracy, aspect="auto", cmap="viridis")
        for (i, j), value in np.ndenumerate(accuracy):
            if not np.isnan(value):
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if value < np.nanmean(accuracy) else "black")
        ax.set_xticks(range(len(times)), labels=[f"{time:g}" for time in times], fontsize=7)
        ax.set_yticks(range(len(layers)), labels=layers, fontsize=7)
        ax.set_xlabel(TIME_LABEL)
        ax.set_ylabel("block")
        figure.colorbar(image, ax=ax, label="linear test accuracy (%)")
        ax.set_title(panel_title(row), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_attention_over_t(collected: Collected, path: Path) -> None:
    """The Transformer's CLS attention over the time tokens (selected lr, mean over probe seeds), ± std over
    pretraining seeds; the weight on the CLS key itself is left out."""
    keys = sorted(collected.attention, key=row_order)
    if not keys:
        return
    figure, axes = panels(keys)
    for ax, row in zip(axes, keys):
        weights = np.array(list(collected.attention[row].values()))[:, :-1]
        times = collected.times[row]
        ax.errorbar(times, weights.mean(axis=0), yerr=weights.std(axis=0, ddof=1) if len(weights) > 1 else None,
                    fmt="o-", capsize=2)
        ax.set_ylabel("CLS attention (± std over seeds)")
        time_axes(ax, collected.sde.get(row))
        ax.set_title(panel_title(row), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_per_task(by_encoder: dict, path: Path, key: str, ylabel: str, scale: float = 1.0) -> None:
    """One panel per encoder, one line per task: entry[f"{key}mean"] ± entry[f"{key}std"] over entry["times"]."""
    keys = sorted(by_encoder, key=row_order)
    figure, axes = panels(keys)
    for ax, encoder in zip(axes, keys):
        for task, entry in sorted(by_encoder[encoder].items()):
            mean, std = scale * np.array(entry[f"{key}mean"]), scale * np.array(entry[f"{key}std"])
            ax.plot(entry["times"], mean, "o-", label=task)
            ax.fill_between(entry["times"], mean - std, mean + std, alpha=0.15)
        ax.set_title(panel_title(encoder), fontsize=9)
        ax.set(xlabel=TIME_LABEL, ylabel=ylabel)
        ax.legend(fontsize=7, title="band: ± std over seeds", title_fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_heat_maps(by_encoder: dict, path: Path, labels_key: str, values_key: str, label: str) -> None:
    """One square heat map per encoder: entry[values_key] with entry[labels_key] on both axes."""
    keys = sorted(by_encoder, key=row_order)
    figure, axes = panels(keys)
    for ax, encoder in zip(axes, keys):
        labels = [f"{v:g}" if isinstance(v, float) else str(v) for v in by_encoder[encoder][labels_key]]
        image = ax.imshow(np.array(by_encoder[encoder][values_key]), cmap="viridis", vmin=0)
        ax.set_title(panel_title(encoder), fontsize=9)
        ax.set(xticks=range(len(labels)), yticks=range(len(labels)))
        ax.set_xticklabels(labels, rotation=45, fontsize=7)
        ax.set_yticklabels(labels, fontsize=7)
        figure.colorbar(image, ax=ax, label=label)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_attention_per_class(by_encoder: dict, path: Path) -> None:
    """One heat map per (encoder, task): classes down, times across."""
    keys = sorted(((*encoder, task) for encoder, by_task in by_encoder.items() for task in by_task), key=row_order)
    figure, axes = panels(keys)
    for ax, row in zip(axes, keys):
        entry = by_encoder[row[:-1]][row[-1]]
        image = ax.imshow(np.array(entry["mean"]), cmap="viridis", aspect="auto")
        ax.set(xlabel=TIME_LABEL, ylabel="class", xticks=range(len(entry["times"])))
        ax.set_title(panel_title(row), fontsize=9)
        ax.set_xticklabels([f"{t:g}" for t in entry["times"]], rotation=45, fontsize=7)
        figure.colorbar(image, ax=ax, label="CLS attention")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_masking(masking: dict, path: Path) -> None:
    """Bars: accuracy change (points) when each key is hidden, per task; one panel per encoder."""
    keys = sorted(masking, key=row_order)
    figure, axes = panels(keys)
    for ax, encoder in zip(axes, keys):
        tasks = sorted(masking[encoder])
        width = 0.8 / len(tasks)
        for k, task in enumerate(tasks):
            entry = masking[encoder][task]
            change = 100 * (np.array(entry["drop"]) - entry["full"][0])
            ax.bar(np.arange(len(change)) + k * width, change, width, label=task)
        labels = [f"{t:g}" for t in masking[encoder][tasks[0]]["times"]] + ["CLS"]
        ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2)
        ax.set_xticklabels(labels, fontsize=7)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_title(panel_title(encoder), fontsize=9)
        ax.set(xlabel="hidden key (t)", ylabel="test accuracy change (points)")
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
