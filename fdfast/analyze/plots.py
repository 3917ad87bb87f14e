"""The figures (matplotlib, an optional dependency: ``pip install 'fdfast[analyze]'``).

Each function writes one PNG atomically (no half-written picture is ever left under ``--out``):

* per-head panels, models side by side: x = layer, one dot per head with its 95 % interval (attention
  distance, locality);
* head diversity: per layer, the spread of head distances and the mean pairwise head cosine, one line
  per model with its interval as a band;
* averaged attention maps: rows = chosen layers, columns = heads, a colour bar per panel;
* a loss landscape: the 1-D line and the 2-D contour around the model's weights.

Uniform attention's value on each layer's grid is drawn as a dashed line; value axes start where the
quantity does (0 px, 0 for a share or a cosine, which end at 1) unless ``autoscale``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..files import atomic_write
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


def _value_axis(ax: Any, autoscale: bool, top: Optional[float] = None) -> None:
    """The value axis starts where the quantity does (0), and ends at ``top`` for a bounded one (a share, a
    cosine), so that small differences look small; ``autoscale`` leaves matplotlib's zoom on the data."""
    if autoscale:
        return
    ax.set_ylim(bottom=0.0)
    if top is not None:
        ax.set_ylim(top=top)


def _uniform_line(ax: Any, values: Sequence[float]) -> None:
    """Uniform attention's value per layer (constant for a ViT, per stage for a Swin), dashed."""
    ax.plot(range(len(values)), values, ls="--", lw=1, color="tab:gray", label="uniform attention", zorder=1)


def per_head_panels(models: Sequence[dict], key: str, ylabel: str, title: str, path: Path, *,
                    top: Optional[float] = None, autoscale: bool = False) -> Path:
    """One panel per model (``{'name', 'role', 'layers': [layer summary, ...]}``): x = layer, one dot per
    head of ``layer[key]`` with its 95 % interval ``layer[key + '_ci']``, and uniform attention's value on
    the layer's grid; the panels share the y axis so models compare at a glance."""
    fig = _figure(3.2 * len(models) + 0.6, 3.2)
    axes = np.atleast_1d(fig.subplots(1, len(models), sharey=True, squeeze=False)[0])
    for ax, model in zip(axes, models):
        for i, layer in enumerate(model["layers"]):
            values = np.asarray(layer[key], dtype=float)
            ci = np.asarray(layer[f"{key}_ci"], dtype=float).reshape(-1, 2)
            ax.errorbar([i] * len(values), values, yerr=np.abs(ci.T - values), fmt="o", ms=3.5, alpha=0.75,
                        color="tab:blue", elinewidth=1, capsize=2, zorder=2)
        _uniform_line(ax, [layer["uniform"][key] for layer in model["layers"]])
        ax.set_title(f"{model['name']} ({model['role']})", fontsize=9)
        _layer_axis(ax, len(model["layers"]))
        _value_axis(ax, autoscale, top)
    axes[0].set_ylabel(ylabel)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{title} (bars: 95 % interval over the images)", fontsize=10)
    return _save(fig, path)


def _band(ax: Any, layers: list, key: str, label: str) -> None:
    """A model's per-layer values of ``key`` as a line with its 95 % interval as a band."""
    x = np.arange(len(layers))
    values = np.array([np.nan if lay[key] is None else lay[key] for lay in layers], dtype=float)
    ci = np.array([[np.nan, np.nan] if lay[f"{key}_ci"] is None else lay[f"{key}_ci"] for lay in layers],
                  dtype=float)
    line, = ax.plot(x, values, marker="o", ms=3, label=label)
    ax.fill_between(x, ci[:, 0], ci[:, 1], color=line.get_color(), alpha=0.2, linewidth=0)


def diversity_plot(models: Sequence[dict], path: Path, *, autoscale: bool = False) -> Path:
    """Left: spread (std) of the heads' distances per layer; right: mean pairwise head cosine; each with
    its 95 % interval and uniform attention's value (spread 0, cosine 1)."""
    fig = _figure(8.0, 3.2)
    left, right = fig.subplots(1, 2)
    for model in models:
        label = f"{model['name']} ({model['role']})"
        _band(left, model["layers"], "distance_spread_px", label)
        _band(right, model["layers"], "head_cosine", label)
    n = max(len(m["layers"]) for m in models)
    _uniform_line(left, [0.0] * n)
    _uniform_line(right, [1.0] * n)
    left.set(ylabel="std of head distances (px)", title="spread of head distances (higher = more diverse)")
    right.set(ylabel="mean pairwise cosine", title="head similarity (lower = more diverse)")
    for ax, top in ((left, None), (right, 1.02)):
        ax.title.set_fontsize(9)
        _layer_axis(ax, n)
        _value_axis(ax, autoscale, top)
    left.legend(fontsize=7)
    return _save(fig, path)


def attention_maps_plot(name: str, maps: dict[str, torch.Tensor], scores: dict[str, list], path: Path) -> Path:
    """Averaged patch-to-patch maps ``{layer name: (H, P, P)}``, one row per layer, one column per head,
    each titled with its locality score and with a colour bar of its own scale."""
    heads = min(MAX_HEADS_SHOWN, max(m.shape[0] for m in maps.values()))
    fig = _figure(max(2.0 * heads + 0.8, 6.0), 1.7 * len(maps) + 0.4)  # wide enough for the title
    axes = fig.subplots(len(maps), heads, squeeze=False)
    for row, (layer, m) in zip(axes, maps.items()):
        for h, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            if h >= m.shape[0]:
                ax.set_axis_off()
                continue
            image = ax.imshow(m[h].numpy(), cmap="viridis", interpolation="nearest")
            bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
            bar.ax.tick_params(labelsize=5)
            bar.formatter.set_useOffset(False)
            ax.set_title(f"h{h} loc {scores[layer][h]:.2f}", fontsize=7)
        row[0].set_ylabel(layer, fontsize=7)
    fig.suptitle(f"{name}: averaged attention maps (rows: queries; colour: attention weight)", fontsize=9)
    return _save(fig, path)


def landscape_plot(name: str, loss_name: str, land: dict, path: Path, *, autoscale: bool = False) -> Path:
    """1-D line L(θ* + αδ) (its loss axis from 0) and 2-D contour L(θ* + αδ + βη)."""
    fig = _figure(8.0, 3.4)
    line_ax, plane_ax = fig.subplots(1, 2)
    line_ax.plot(land["alphas"], land["line"], marker="o", ms=3)
    line_ax.set(xlabel="α (filter-normalised direction δ)", ylabel=f"{loss_name} loss", title="1-D slice")
    line_ax.grid(alpha=0.3)
    _value_axis(line_ax, autoscale)
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
