"""The figures (matplotlib, an optional dependency: ``pip install 'fdfast[analyze]'``).

Each function writes one PNG atomically (no half-written picture is ever left under ``--out``):

* per-head panels, models side by side: x = layer, one dot per head (attention distance, locality);
* head diversity: per layer, the spread of head distances and the mean pairwise head cosine, one line
  per model;
* averaged attention maps: rows = chosen layers, columns = heads;
* a loss landscape: the 1-D line and the 2-D contour around the model's weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..checkpoint import atomic_write
from ..errors import MissingDependency

DPI = 100
MAX_HEADS_SHOWN = 8  # attention-map columns; wider layers show their first heads


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.figure import Figure  # optional dependency: only the figures need it
    except ImportError:
        raise MissingDependency("fdfast-analyze draws its figures with matplotlib: pip install 'fdfast[analyze]' "
                                "(or pip install matplotlib)") from None
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return path


def _layer_axis(ax: Any, n: int) -> None:
    from matplotlib.ticker import MaxNLocator  # optional dependency, imported with the figure

    ax.set_xlabel("layer")
    ax.set_xlim(-0.5, n - 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.grid(alpha=0.3)


def per_head_panels(models: Sequence[dict], key: str, ylabel: str, title: str, path: Path) -> Path:
    """One panel per model (``{'name', 'role', 'layers': [layer summary, ...]}``): x = layer, one dot per
    head of ``layer[key]``; the panels share the y axis so models compare at a glance."""
    fig = _figure(3.2 * len(models) + 0.6, 3.2)
    axes = np.atleast_1d(fig.subplots(1, len(models), sharey=True, squeeze=False)[0])
    for ax, model in zip(axes, models):
        for i, layer in enumerate(model["layers"]):
            values = layer[key]
            ax.scatter([i] * len(values), values, s=14, alpha=0.75, color="tab:blue", linewidths=0)
        ax.set_title(f"{model['name']} ({model['role']})", fontsize=9)
        _layer_axis(ax, len(model["layers"]))
    axes[0].set_ylabel(ylabel)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def diversity_plot(models: Sequence[dict], path: Path) -> Path:
    """Left: spread (std) of the heads' distances per layer; right: mean pairwise head cosine."""
    fig = _figure(8.0, 3.2)
    left, right = fig.subplots(1, 2)
    for model in models:
        layers = model["layers"]
        label = f"{model['name']} ({model['role']})"
        left.plot(range(len(layers)), [lay["distance_spread_px"] for lay in layers], marker="o", ms=3, label=label)
        cosine = [np.nan if lay["head_cosine"] is None else lay["head_cosine"] for lay in layers]
        right.plot(range(len(layers)), cosine, marker="o", ms=3, label=label)
    left.set(ylabel="std of head distances (px)", title="spread of head distances (higher = more diverse)")
    right.set(ylabel="mean pairwise cosine", title="head similarity (lower = more diverse)")
    for ax in (left, right):
        ax.title.set_fontsize(9)
        _layer_axis(ax, max(len(m["layers"]) for m in models))
    left.legend(fontsize=7)
    return _save(fig, path)


def attention_maps_plot(name: str, maps: dict[str, torch.Tensor], scores: dict[str, list], path: Path) -> Path:
    """Averaged patch-to-patch maps ``{layer name: (H, P, P)}``, one row per layer, one column per head,
    each titled with its locality score."""
    heads = min(MAX_HEADS_SHOWN, max(m.shape[0] for m in maps.values()))
    fig = _figure(1.6 * heads + 0.8, 1.7 * len(maps) + 0.4)
    axes = fig.subplots(len(maps), heads, squeeze=False)
    for row, (layer, m) in zip(axes, maps.items()):
        for h, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            if h >= m.shape[0]:
                ax.set_axis_off()
                continue
            ax.imshow(m[h].numpy(), cmap="viridis", interpolation="nearest")
            ax.set_title(f"h{h} loc {scores[layer][h]:.2f}", fontsize=7)
        row[0].set_ylabel(layer, fontsize=7)
    fig.suptitle(f"{name}: averaged attention maps (rows: queries)", fontsize=9)
    return _save(fig, path)


def landscape_plot(name: str, loss_name: str, land: dict, path: Path) -> Path:
    """1-D line L(θ* + αδ) and 2-D contour L(θ* + αδ + βη)."""
    fig = _figure(8.0, 3.4)
    line_ax, plane_ax = fig.subplots(1, 2)
    line_ax.plot(land["alphas"], land["line"], marker="o", ms=3)
    line_ax.set(xlabel="α (filter-normalised direction δ)", ylabel=f"{loss_name} loss", title="1-D slice")
    line_ax.grid(alpha=0.3)
    grid = np.asarray(land["plane"], dtype=float)
    a, b = np.meshgrid(land["betas"], land["betas"])
    # contour levels must increase: a flat plane (e.g. a constant loss) gets one band around its value
    levels = np.linspace(grid.min(), grid.max(), 16) if np.ptp(grid) > 0 else [grid.min() - 1, grid.max() + 1]
    contour = plane_ax.contourf(a, b, grid, levels=levels, cmap="viridis")
    if np.ptp(grid) > 0:
        plane_ax.contour(a, b, grid, levels=levels, colors="white", linewidths=0.4)
    plane_ax.plot([0], [0], marker="+", color="red", ms=10)
    plane_ax.set(xlabel="α", ylabel="β", title="2-D slice")
    fig.colorbar(contour, ax=plane_ax, label=f"{loss_name} loss")
    for ax in (line_ax, plane_ax):
        ax.title.set_fontsize(9)
    fig.suptitle(f"{name}: loss landscape around the weights", fontsize=10)
    return _save(fig, path)
