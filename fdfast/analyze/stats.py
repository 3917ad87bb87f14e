"""How sure the report may be: percentile bootstrap intervals over the analysed images, and the rule that
calls a model ahead of another.

Every number of the report is a mean over images, or a function of such means (the spread of a layer's
head distances is a standard deviation over heads of per-head means). Its interval resamples the images
with replacement (``resamples`` times, seeded: the same resamples for every model), recomputes the number
on each resample and takes the 2.5th and 97.5th percentiles (Efron's percentile bootstrap, 95 %).

A model is ahead only where its interval and every other model's do not overlap, *and* the gap between
the values is at least ``min_effect`` times the measure's scale (distances: the larger uniform-attention
distance of the compared grids; locality and head cosine: their range, 1; a loss rise: the larger of the
rises). The second condition exists because two models that both attend almost uniformly differ by
hundredths of a pixel *consistently* over images: their intervals can separate although neither has a
spatial preference worth the name. ``min_effect=0`` keeps the interval rule alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

CONFIDENCE = 0.95
NO_DIFFERENCE = "no difference at this sample size"


class Bootstrap:
    """``resamples`` seeded resamples (with replacement) of ``n`` images, as a (resamples, n) matrix of
    weights, so the mean of any per-image array over every resample is one matrix product."""

    def __init__(self, n: int, resamples: int = 1000, seed: int = 0):
        if n < 1 or resamples < 1:
            raise ValueError(f"a bootstrap needs images and resamples, got n={n}, resamples={resamples}")
        gen = torch.Generator().manual_seed(seed)
        index = torch.randint(0, n, (resamples, n), generator=gen)
        counts = torch.zeros(resamples, n, dtype=torch.float64)
        counts.scatter_add_(1, index, torch.ones_like(counts))
        self.n, self.resamples, self.weights = n, resamples, counts / n

    def means(self, values: torch.Tensor) -> torch.Tensor:
        """(n, ...) per-image values -> (resamples, ...) their mean within each resample."""
        if values.shape[0] != self.n:
            raise ValueError(f"{values.shape[0]} per-image values for a bootstrap over {self.n} images")
        flat = values.double().reshape(self.n, -1)
        return (self.weights @ flat).reshape(self.resamples, *values.shape[1:])

    def interval(self, values: torch.Tensor,
                 statistic: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> list:
        """95 % percentile interval of ``statistic(mean over images)`` (default: the mean itself):
        ``[low, high]``, or a list of them per trailing entry (e.g. per head)."""
        samples = self.means(values)
        if statistic is not None:
            samples = statistic(samples)
        return percentile_interval(samples)


def percentile_interval(samples: torch.Tensor) -> list:
    """(resamples, ...) -> ``[low, high]`` (a scalar statistic) or ``[[low, high], ...]`` (one per entry)."""
    tail = (1 - CONFIDENCE) / 2
    q = torch.tensor([tail, 1 - tail], dtype=torch.float64)
    bounds = torch.quantile(samples.double().reshape(samples.shape[0], -1), q, dim=0)  # (2, entries)
    pairs = bounds.T.tolist()
    return pairs[0] if samples.ndim == 1 else pairs


@dataclass(frozen=True)
class Estimate:
    """A value with its 95 % interval."""
    value: float
    low: float
    high: float


def fmt_estimate(e: Estimate, spec: str = ".4g") -> str:
    return f"{format(e.value, spec)} [{format(e.low, spec)}, {format(e.high, spec)}]"


def compare(estimates: dict[str, Optional[Estimate]], *, higher: bool, scale: float, min_effect: float) -> str:
    """One markdown phrase for a claim: ``**A** ahead (...)`` when A's interval is apart from every other
    model's and the gap to the next value is at least ``min_effect * scale``; otherwise which models the
    data cannot tell apart, and why."""
    have = {n: e for n, e in estimates.items() if e is not None}
    if len(have) < 2:
        return "needs two models with this measure"
    order = sorted(have, key=lambda n: have[n].value, reverse=higher)
    best, runner = have[order[0]], have[order[1]]

    def apart(other: Estimate) -> bool:
        return best.low > other.high if higher else best.high < other.low
    tied = [n for n in order[1:] if not apart(have[n])]
    listing = ", ".join(f"{n} {fmt_estimate(have[n])}" for n in order)
    if tied:
        return f"{NO_DIFFERENCE}: the intervals of {order[0]} and {', '.join(tied)} overlap ({listing})"
    gap, least = abs(best.value - runner.value), min_effect * scale
    if gap < least:
        return (f"no difference above --min-effect: the intervals separate, but {order[0]} leads {order[1]} by "
                f"{gap:.3g}, less than {least:.3g} ({listing})")
    return f"**{order[0]}** ahead: {listing}"
