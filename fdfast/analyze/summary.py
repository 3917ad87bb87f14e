"""The numbers the report states, each with its 95 % bootstrap interval over the images
(:mod:`fdfast.analyze.stats`): per layer (per head, the spread of the heads' distances, the head cosine)
and per model (averages over layers and heads, the landscape's centre loss and its rise at ±span), next to
the values uniform attention would have on the same grids."""
from __future__ import annotations

from typing import Optional

import torch

from .stats import Bootstrap, percentile_interval


def layer_intervals(values: dict[str, torch.Tensor], boot: Bootstrap) -> dict:
    """``*_ci`` entries of one layer's summary from its per-image values (:meth:`LayerStats.per_image`)."""
    distance, heads = values["distance_px"], values["distance_px"].shape[1]
    return {
        "distance_px_ci": boot.interval(distance),
        "distance_spread_px_ci": boot.interval(distance, lambda m: m.std(-1, unbiased=False)),
        "locality_ci": boot.interval(values["locality"]),
        "head_cosine_ci": boot.interval(values["head_cosine"]) if heads > 1 else None,
    }


def _estimate(per_image: torch.Tensor, boot: Bootstrap) -> tuple[float, list]:
    return float(per_image.double().mean()), boot.interval(per_image)


def model_summary(layers: list[dict], per_image: list[dict], boot: Bootstrap, land: Optional[dict] = None,
                  land_boot: Optional[Bootstrap] = None) -> dict:
    """Per model: mean distance and locality over every head of every layer, mean spread of the heads'
    distances and mean head cosine over layers, each with ``<key>_ci``; the landscape's ``loss`` (at the
    weights) and ``loss_rise`` (mean of the two ends of the 1-D slice minus the centre) with theirs, over the
    landscape images; ``uniform``: the same averages for uniform attention on the model's grids."""
    out: dict = {}
    for key in ("distance_px", "locality"):  # every (layer, head) counts once, as in the per-layer tables
        value, ci = _estimate(torch.cat([v[key] for v in per_image], dim=1).mean(1), boot)
        out.update({key: value, f"{key}_ci": ci})
    spreads = torch.stack([boot.means(v["distance_px"]).std(-1, unbiased=False) for v in per_image]).mean(0)
    out["distance_spread_px"] = sum(lay["distance_spread_px"] for lay in layers) / len(layers)
    out["distance_spread_px_ci"] = percentile_interval(spreads)
    cosines = [v["head_cosine"] for v in per_image if v["distance_px"].shape[1] > 1]
    out["head_cosine"], out["head_cosine_ci"] = (_estimate(torch.stack(cosines).mean(0), boot) if cosines
                                                 else (None, None))
    out.update(loss=None, loss_ci=None, loss_rise=None, loss_rise_ci=None)
    if land is not None and land_boot is not None:
        ends = land["per_image"]
        center = torch.tensor(ends["center"], dtype=torch.float64)
        rise = (torch.tensor(ends["minus"], dtype=torch.float64) + torch.tensor(ends["plus"], dtype=torch.float64)) / 2
        out["loss"], out["loss_ci"] = _estimate(center, land_boot)
        out["loss_rise"], out["loss_rise_ci"] = _estimate(rise - center, land_boot)
    weights = [lay["heads"] for lay in layers]
    out["uniform"] = {
        key: sum(w * lay["uniform"][key] for w, lay in zip(weights, layers)) / sum(weights)
        for key in ("distance_px", "locality")}
    out["uniform"].update(head_cosine=1.0, distance_spread_px=0.0)
    return out
