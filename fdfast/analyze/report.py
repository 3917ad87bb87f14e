"""Writing the outputs under ``--out``: one JSON per diagnostic, the figures, and ``report.md``.

Every file is written atomically (:func:`fdfast.files.atomic_write`), so a crash never leaves a
half-written one. ``report.md`` links each figure and puts the numbers behind FD's three claims
(more diverse heads, more diagonal attention, flatter landscape), each with its 95 % interval over the
images, in one table beside what uniform attention scores on the same grids; a claim names a model only
where :func:`fdfast.analyze.stats.compare` says the data separate it.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..files import atomic_write, make_folder
from . import plots
from .stats import Estimate, compare, fmt_estimate

LOSS_NAMES = {"fd": "FD", "ce": "cross-entropy"}  # FD: SmoothL1 vs the whitened teacher tokens
MODEL_KEYS = ("role", "source", "img_size", "mean", "std")
DISTANCE_KEYS = ("name", "heads", "grid", "token_px", "windowed", "maps", "images", "distance_px", "distance_px_ci",
                 "cls_mass")


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


def write_per_image(path: Path, values: list[dict], layers: list[dict]) -> Path:
    """Each image's values, ``<layer>.<measure>``: what every interval of the report resamples."""
    return write_maps(path, {f"{lay['name']}.{k}": v for lay, vals in zip(layers, values) for k, v in vals.items()})


def _mean(values) -> Optional[float]:
    """Mean of the defined values; None when there are none (JSON has no NaN)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


def _fmt(value: Optional[float], spec: str = ".3g") -> str:
    return "n/a" if value is None else format(value, spec)


def estimate(summary: dict, key: str) -> Optional[Estimate]:
    """``summary[key]`` with its interval ``summary[key + '_ci']``; None where the model has no such value."""
    ci = summary.get(f"{key}_ci")
    return None if summary.get(key) is None or ci is None else Estimate(summary[key], *ci)


def _cell(summary: dict, key: str) -> str:
    e = estimate(summary, key)
    return "n/a" if e is None else fmt_estimate(e)


def _claim(summaries: dict, key: str, higher: bool, min_effect: float, among: Optional[list] = None) -> str:
    names = among if among is not None else list(summaries)
    scale = 1.0
    if key.endswith("_px"):  # pixels: against the largest uniform-attention distance of the compared grids
        scale = max(summaries[n]["uniform"]["distance_px"] for n in names)
    elif key == "loss_rise":
        scale = max((abs(summaries[n]["loss_rise"]) for n in names if summaries[n]["loss_rise"] is not None),
                    default=0.0)
    return compare({n: estimate(summaries[n], key) for n in names}, higher=higher, scale=scale,
                   min_effect=min_effect)


def landscape_status(landscapes: dict, skipped: dict) -> str:
    """What the landscapes can compare: a flatness comparison needs two models with the same loss."""
    by_loss: dict[str, list] = {}
    for n, land in landscapes.items():
        by_loss.setdefault(land["loss"], []).append(n)
    own = "teachers and headless backbones have no loss of their own; --teacher-landscape gives a teacher the FD " \
          "loss against its own whitened tokens"
    if not landscapes and set(skipped.values()) == {"--no-landscape"}:
        return "none computed (--no-landscape)"
    if not landscapes:
        return f"none of the {len(skipped)} model(s) has a loss ({own}), so there is no landscape comparison"
    pairs = {k: v for k, v in by_loss.items() if len(v) >= 2}
    listing = "; ".join(f"{LOSS_NAMES[k]}: {', '.join(v)}" for k, v in sorted(by_loss.items()))
    if not pairs:
        return f"only one model per loss has one ({listing}), so there is no flatness comparison ({own})"
    return f"compared within one loss ({listing})"


def _near_uniform(s: dict, min_effect: float) -> bool:
    u = s["uniform"]
    cosine = s["head_cosine"] is None or s["head_cosine"] >= 1 - min_effect
    return (abs(s["distance_px"] - u["distance_px"]) <= min_effect * u["distance_px"]
            and abs(s["locality"] - u["locality"]) <= min_effect and cosine)


def write_report(out: Path, models: dict, summaries: dict, landscapes: dict, skipped: dict, figures: dict,
                 settings: dict) -> Path:
    """``report.md``: settings, what the landscapes can compare, the summary table with intervals, the
    uniform-attention reference, the claims at a glance and every figure."""
    boot, effect = settings["bootstrap"], settings["bootstrap"]["min_effect"]
    lines = ["# fdfast-analyze report", "",
             (f"{settings['images']} images ({settings['data']}), landscapes on {settings['landscape_images']} of "
              f"them, device {settings['device']}. Locality radius {settings['radius']} patch(es)."), "",
             (f"Every number is a mean over the images with its {boot['confidence']:.0%} interval [low, high] "
              f"(percentile bootstrap, {boot['resamples']} resamples of the images, seed {boot['seed']}). A model is "
              "called ahead only where its interval is apart from every other model's and the gap is at least "
              f"--min-effect {effect:g} of the measure's scale (pixels: the uniform-attention distance; locality "
              "and cosine: 1); otherwise the data show no difference."), "",
             f"**Loss landscapes** need two models with the same loss: {landscape_status(landscapes, skipped)}.",
             "",
             ("| model | role | source | mean attention distance (px) | spread of head distances (px) | "
              "head cosine | locality | landscape loss | loss rise at ±span |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in models.items():
        s = summaries[name]
        loss = f"{_cell(s, 'loss')} ({landscapes[name]['loss']})" if name in landscapes else "n/a"
        lines.append(f"| {name} | {entry['role']} | `{entry['source']}` | {_cell(s, 'distance_px')} | "
                     f"{_cell(s, 'distance_spread_px')} | {_cell(s, 'head_cosine')} | {_cell(s, 'locality')} | "
                     f"{loss} | {_cell(s, 'loss_rise')} |")
    lines += ["", "Uniform attention (every query spreads its mass evenly over the patches) on each model's grid "
              "scores:", "", "| model | grid | mean attention distance (px) | spread (px) | head cosine | locality |",
              "|---|---|---|---|---|---|"]
    for name, entry in models.items():
        u, grids = summaries[name]["uniform"], sorted({"x".join(map(str, lay["grid"])) for lay in entry["layers"]})
        lines.append(f"| {name} | {', '.join(grids)} | {_fmt(u['distance_px'], '.4g')} | 0 | 1 | "
                     f"{_fmt(u['locality'], '.4g')} |")
    by_loss: dict[str, list] = {}
    falling = [n for n in landscapes if summaries[n]["loss_rise_ci"][1] < 0]
    for n, land in landscapes.items():
        if n not in falling:
            by_loss.setdefault(land["loss"], []).append(n)
    flat = " / ".join(f"{LOSS_NAMES[kind]}: {_claim(summaries, 'loss_rise', False, effect, names)}"
                      for kind, names in sorted(by_loss.items())) or (
        "no model at a minimum of its loss" if landscapes else "no model with a loss")
    lines += ["", "## The paper's claims at a glance", "",
              (f"* **More diverse heads**, larger spread of head distances: "
               f"{_claim(summaries, 'distance_spread_px', True, effect)}."),
              f"* **More diverse heads**, lower head cosine: {_claim(summaries, 'head_cosine', False, effect)}.",
              (f"* **More diagonal attention** (more mass near the query): "
               f"{_claim(summaries, 'locality', True, effect)}."),
              f"* Shorter mean attention distance: {_claim(summaries, 'distance_px', False, effect)}.",
              f"* **Flatter loss landscape** (smallest rise at ±span, compared within one loss): {flat}.", ""]
    if falling:
        lines += [(f"Not at a minimum of their loss (lower at ±span than at the weights: the whole interval of the "
                   f"rise is below 0), so left out of the flatness comparison: {', '.join(falling)}."), ""]
    uniform = [n for n, s in summaries.items() if _near_uniform(s, effect)]
    if uniform:
        lines += [(f"Near-uniform attention: {', '.join(uniform)} (distance, locality and head cosine within "
                   f"--min-effect of uniform attention on the grid): no spatial preference to compare."), ""]
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


def write_outputs(out: Path, models: dict, summaries: dict, per_image: dict, maps: dict, landscapes: dict,
                  skipped: dict, settings: dict) -> list[Path]:
    """Everything under ``out``: JSON, figures, averaged maps, per-image values, report. ``models[name]``
    holds ``role``, ``source``, ``img_size`` and ``layers`` (layer summaries with intervals);
    ``summaries[name]`` the per-model numbers; ``maps[name]`` the chosen layers' maps."""
    make_folder(out)
    panels = [{"name": n, **m} for n, m in models.items()]
    autoscale = settings["autoscale"]

    def per_layer(pick) -> dict:
        return {n: {"layers": [pick(lay) for lay in m["layers"]]} for n, m in models.items()}

    def uniform(lay: dict, key: str) -> dict:
        return {"uniform": lay["uniform"][key]}
    distance = {n: {**_pick(models[n], MODEL_KEYS), **entry} for n, entry in per_layer(
        lambda lay: {**_pick(lay, DISTANCE_KEYS), **uniform(lay, "distance_px")}).items()}
    diversity = per_layer(lambda lay: {
        **_pick(lay, ("name", "distance_spread_px", "distance_spread_px_ci", "head_cosine", "head_cosine_ci")),
        "distance_min_px": min(lay["distance_px"]), "distance_max_px": max(lay["distance_px"]),
        "uniform": {k: lay["uniform"][k] for k in ("distance_spread_px", "head_cosine")}})
    diagonal = per_layer(lambda lay: {**_pick(lay, ("name", "locality", "locality_ci")),
                                      "mean": _mean(lay["locality"]), **uniform(lay, "locality")})
    for n in models:
        diagonal[n].update(maps_file=f"attention_maps_{n}.npz", shown_layers=list(maps[n]))
    written = [write_json(out / "attention_distance.json", {**settings, "models": distance}),
               write_json(out / "head_diversity.json", {**settings, "models": diversity}),
               write_json(out / "diagonality.json", {**settings, "models": diagonal}),
               write_json(out / "landscape.json", {**settings, "models": landscapes, "skipped": skipped})]
    figures = {
        "Average attention distance per head": [plots.per_head_panels(
            panels, "distance_px", "mean attention distance (px)", "average attention distance, one dot per head",
            out / "attention_distance.png", autoscale=autoscale)],
        "Head diversity": [plots.diversity_plot(panels, out / "head_diversity.png", autoscale=autoscale)],
        "Attention-map diagonality": [plots.per_head_panels(
            panels, "locality", f"attention mass within {settings['radius']} patch(es)",
            "locality (diagonality) of each head", out / "diagonality.png", top=1.0, autoscale=autoscale)],
        "Averaged attention maps": [],
        "Loss landscapes": [],
    }
    for name, layer_maps in maps.items():
        written.append(write_maps(out / f"attention_maps_{name}.npz", layer_maps))
        written.append(write_per_image(out / f"per_image_{name}.npz", per_image[name], models[name]["layers"]))
        scores = {lay["name"]: lay["locality"] for lay in models[name]["layers"]}
        figures["Averaged attention maps"].append(
            plots.attention_maps_plot(name, layer_maps, scores, out / f"attention_maps_{name}.png"))
    for name, land in landscapes.items():
        figures["Loss landscapes"].append(plots.landscape_plot(
            name, LOSS_NAMES[land["loss"]], land, out / f"landscape_{name}.png", autoscale=autoscale))
    written += [p for files in figures.values() for p in files]
    written.append(write_json(out / "summary.json", {**settings, "models": summaries}))
    written.append(write_report(out, models, summaries, landscapes, skipped, figures, settings))
    return written
