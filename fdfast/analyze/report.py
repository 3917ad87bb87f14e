"""Writing the outputs under ``--out``: one JSON per diagnostic, the figures, and ``report.md``.

Every file is written atomically (:func:`fdfast.checkpoint.atomic_write`), so a crash never leaves a
half-written one. ``report.md`` links each figure and puts the numbers behind FD's three claims
(more diverse heads, more diagonal attention, flatter landscape) in one table.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..checkpoint import atomic_write, make_folder
from . import plots

LOSS_NAMES = {"fd": "FD", "ce": "cross-entropy"}  # FD: SmoothL1 vs the whitened teacher tokens
MODEL_KEYS = ("role", "source", "img_size", "mean", "std")
DISTANCE_KEYS = ("name", "heads", "grid", "token_px", "windowed", "maps", "distance_px", "cls_mass")


def _pick(d: dict, keys: tuple) -> dict:
    return {k: d[k] for k in keys}


def write_json(path: Path, data: dict) -> Path:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1) + "\n"))
    return path


def write_maps(path: Path, maps: dict[str, torch.Tensor]) -> Path:
    def write(tmp: Path) -> None:
        buffer = io.BytesIO()  # np.savez appends '.npz' to a file name; a buffer keeps the temporary name
        np.savez_compressed(buffer, **{k: v.numpy() for k, v in maps.items()})
        tmp.write_bytes(buffer.getvalue())
    atomic_write(path, write)
    return path


def _mean(values) -> Optional[float]:
    """Mean of the defined values; None when there are none (JSON has no NaN)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


def model_summary(entry: dict, land: Optional[dict]) -> dict:
    """The report's per-model numbers: averages over layers (and heads) of each diagnostic."""
    layers = entry["layers"]
    out = {
        "distance_px": _mean(d for lay in layers for d in lay["distance_px"]),
        "distance_spread_px": _mean(lay["distance_spread_px"] for lay in layers),
        "head_cosine": _mean(lay["head_cosine"] for lay in layers),
        "locality": _mean(v for lay in layers for v in lay["locality"]),
        "loss": None, "loss_rise": None,
    }
    if land is not None:
        ends = [land["line"][0], land["line"][-1]]
        out["loss"], out["loss_rise"] = land["center"], sum(ends) / 2 - land["center"]
    return out


def _fmt(value: Optional[float], spec: str = ".3g") -> str:
    return "n/a" if value is None else format(value, spec)


def _best(summaries: dict, key: str, highest: bool, among: Optional[list] = None) -> str:
    names = [n for n in (among if among is not None else summaries) if summaries[n][key] is not None]
    if len(names) < 2:
        return "needs two models with this measure"
    pick = (max if highest else min)(names, key=lambda n: summaries[n][key])
    return f"**{pick}** ({_fmt(summaries[pick][key])})"


def write_report(out: Path, models: dict, summaries: dict, landscapes: dict, skipped: dict, figures: dict,
                 settings: dict) -> Path:
    """``report.md``: settings, the summary table, the claims at a glance and every figure."""
    lines = ["# fdfast-analyze report", "",
             (f"{settings['images']} images ({settings['data']}), landscapes on {settings['landscape_images']} of "
              f"them, device {settings['device']}. Locality radius {settings['radius']} patch(es)."), "",
             ("| model | role | source | mean attention distance (px) | spread of head distances (px) | "
              "head cosine | locality | landscape loss | loss rise at ±span |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in models.items():
        s = summaries[name]
        loss = f"{_fmt(s['loss'])} ({landscapes[name]['loss']})" if name in landscapes else "n/a"
        lines.append(f"| {name} | {entry['role']} | `{entry['source']}` | {_fmt(s['distance_px'])} | "
                     f"{_fmt(s['distance_spread_px'])} | {_fmt(s['head_cosine'])} | {_fmt(s['locality'])} | "
                     f"{loss} | {_fmt(s['loss_rise'])} |")
    by_loss: dict[str, list] = {}
    for n, land in landscapes.items():
        by_loss.setdefault(land["loss"], []).append(n)
    flat = " / ".join(f"{kind}: {_best(summaries, 'loss_rise', False, names)}"
                      for kind, names in sorted(by_loss.items())) or "no model with a loss"
    spread, cosine = _best(summaries, "distance_spread_px", True), _best(summaries, "head_cosine", False)
    lines += ["", "## The paper's claims at a glance", "",
              (f"* **More diverse heads** (larger spread of head distances, lower head cosine): widest spread "
               f"{spread}; least similar heads {cosine}."),
              f"* **More diagonal attention** (more mass near the query): {_best(summaries, 'locality', True)}.",
              f"* **Flatter loss landscape** (smallest rise at ±span, compared within one loss): {flat}.", ""]
    if any(lay["windowed"] for entry in models.values() for lay in entry["layers"]):
        lines += [("Swin models attend within windows: their maps are window-local (w² x w² tokens) and distances "
                   "are pixels between token centres in the image, a token covering img_size / stage resolution "
                   "pixels."), ""]
    for reason_name, reason in skipped.items():
        lines.append(f"* No landscape for {reason_name}: {reason}.")
    lines += ["", "## Figures", ""]
    for title, files in figures.items():
        lines.append(f"### {title}")
        lines.append("")
        lines += [f"![{title}: {Path(f).stem}]({Path(f).name})" for f in files]
        lines.append("")
    path = out / "report.md"
    atomic_write(path, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    return path


def write_outputs(out: Path, models: dict, maps: dict, landscapes: dict, skipped: dict, settings: dict) -> list[Path]:
    """Everything under ``out``: JSON, figures, averaged maps, report. ``models[name]`` holds ``role``,
    ``source``, ``img_size`` and ``layers`` (layer summaries); ``maps[name]`` the chosen layers' maps."""
    make_folder(out)
    panels = [{"name": n, **m} for n, m in models.items()]
    def per_layer(pick) -> dict:
        return {n: {"layers": [pick(lay) for lay in m["layers"]]} for n, m in models.items()}

    distance = {n: {**_pick(models[n], MODEL_KEYS), **entry}
                for n, entry in per_layer(lambda lay: _pick(lay, DISTANCE_KEYS)).items()}
    diversity = per_layer(lambda lay: {"name": lay["name"], "distance_spread_px": lay["distance_spread_px"],
                                       "distance_min_px": min(lay["distance_px"]),
                                       "distance_max_px": max(lay["distance_px"]), "head_cosine": lay["head_cosine"]})
    diagonal = per_layer(lambda lay: {"name": lay["name"], "locality": lay["locality"],
                                      "mean": _mean(lay["locality"])})
    for n in models:
        diagonal[n].update(maps_file=f"attention_maps_{n}.npz", shown_layers=list(maps[n]))
    written = [write_json(out / "attention_distance.json", {**settings, "models": distance}),
               write_json(out / "head_diversity.json", {**settings, "models": diversity}),
               write_json(out / "diagonality.json", {**settings, "models": diagonal}),
               write_json(out / "landscape.json", {**settings, "models": landscapes, "skipped": skipped})]
    figures = {
        "Average attention distance per head": [plots.per_head_panels(
            panels, "distance_px", "mean attention distance (px)", "average attention distance, one dot per head",
            out / "attention_distance.png")],
        "Head diversity": [plots.diversity_plot(panels, out / "head_diversity.png")],
        "Attention-map diagonality": [plots.per_head_panels(
            panels, "locality", f"attention mass within {settings['radius']} patch(es)",
            "locality (diagonality) of each head", out / "diagonality.png")],
        "Averaged attention maps": [],
        "Loss landscapes": [],
    }
    for name, layer_maps in maps.items():
        written.append(write_maps(out / f"attention_maps_{name}.npz", layer_maps))
        scores = {lay["name"]: lay["locality"] for lay in models[name]["layers"]}
        figures["Averaged attention maps"].append(
            plots.attention_maps_plot(name, layer_maps, scores, out / f"attention_maps_{name}.png"))
    for name, land in landscapes.items():
        figures["Loss landscapes"].append(
            plots.landscape_plot(name, LOSS_NAMES[land["loss"]], land, out / f"landscape_{name}.png"))
    summaries = {n: model_summary(m, landscapes.get(n)) for n, m in models.items()}
    written += [p for files in figures.values() for p in files]
    written.append(write_json(out / "summary.json", {**settings, "models": summaries}))
    written.append(write_report(out, models, summaries, landscapes, skipped, figures, settings))
    return written
