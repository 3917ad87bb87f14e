"""Attention statistics of spec §5, as tensor functions plus a running accumulator per layer.

Every function takes attention probabilities over *patch* tokens: ``(..., P, P)`` with rows (queries)
summing to 1 over the ``P = gh * gw`` patch keys of a row-major grid. :func:`patch_attention` gets there
from a model's full map: it drops the leading prefix tokens (CLS) and renormalises each query's row over
the patch keys, so a head that parks mass on CLS is measured by where the rest of its mass goes (that CLS
mass is reported separately).

* mean attention distance: ``sum_j A_ij * |p_i - p_j|`` (patch centres in pixels), averaged over queries;
* locality ("diagonality"): the mass a query puts on keys within ``radius`` patches in both directions
  (the 2-D band around the diagonal of a row-major map); the identity map scores 1;
* head cosine: mean pairwise cosine similarity of the heads' flattened maps (1 = identical heads).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


def grid_offsets(grid: tuple[int, int]) -> torch.Tensor:
    """(P, P, 2) integer (row, column) offsets from query patch i to key patch j, row-major order."""
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], dim=-1)
    return pos[None, :, :] - pos[:, None, :]


def distance_matrix(grid: tuple[int, int], token_px: tuple[float, float]) -> torch.Tensor:
    """(P, P) pixel distances between patch centres; ``token_px`` is the (height, width) of one token."""
    off = grid_offsets(grid).double() * torch.tensor(token_px, dtype=torch.float64)
    return off.pow(2).sum(-1).sqrt().float()


def neighbourhood(grid: tuple[int, int], radius: int) -> torch.Tensor:
    """(P, P) bool: key j lies within ``radius`` patches of query i along both axes."""
    return grid_offsets(grid).abs().amax(-1) <= radius


def patch_attention(attn: torch.Tensor, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(patch-to-patch map with rows renormalised over patch keys, mass each patch query gives the prefix
    tokens) from a full ``(..., N, N)`` map whose first ``prefix`` tokens are not patches."""
    attn = attn.float()
    if prefix == 0:
        return attn, attn.new_zeros(attn.shape[:-1])
    patches = attn[..., prefix:, :]
    to_prefix = patches[..., :prefix].sum(-1)
    to_patches = patches[..., prefix:]
    return to_patches / to_patches.sum(-1, keepdim=True).clamp_min(1e-12), to_prefix


def mean_distance(attn: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """``(..., P, P)`` patch attention -> ``(...)`` distance in pixels, averaged over queries."""
    return (attn * distances).sum(-1).mean(-1)


def locality(attn: torch.Tensor, near: torch.Tensor) -> torch.Tensor:
    """``(..., P, P)`` patch attention -> ``(...)`` share of mass within the neighbourhood ``near``."""
    return (attn * near).sum(-1).mean(-1)


def head_cosine(attn: torch.Tensor) -> torch.Tensor:
    """``(B, H, P, P)`` -> ``(B,)`` mean cosine similarity over the H*(H-1)/2 pairs of distinct heads
    (NaN for a single head: diversity is undefined)."""
    b, h = attn.shape[:2]
    if h < 2:
        return attn.new_full((b,), float("nan"))
    flat = torch.nn.functional.normalize(attn.reshape(b, h, -1).float(), dim=-1)
    gram = flat @ flat.transpose(1, 2)
    off_diagonal = gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(-1)
    return off_diagonal / (h * (h - 1))


@dataclass
class LayerGeometry:
    """Where one attention layer's tokens sit: ``grid`` of patch tokens its map spans (the window for
    Swin), ``token_px`` (pixels between neighbouring token centres, height and width), ``prefix`` tokens
    before the patches (CLS), ``windowed`` (Swin: maps are per window, in window-local coordinates)."""
    name: str
    grid: tuple[int, int]
    token_px: tuple[float, float]
    prefix: int = 0
    windowed: bool = False


@dataclass
class LayerStats:
    """Running sums of one layer's statistics over every map it produced (an image, or a Swin window)."""
    geometry: LayerGeometry
    radius: int = 1
    count: int = 0
    distance: Optional[torch.Tensor] = None   # (H,) summed pixel distances
    local: Optional[torch.Tensor] = None      # (H,) summed locality
    prefix_mass: Optional[torch.Tensor] = None  # (H,) summed mass on CLS
    cosine: float = 0.0
    mean_map: Optional[torch.Tensor] = None   # (H, P, P) summed patch maps
    _consts: dict = field(default_factory=dict, repr=False)

    def _const(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._consts:
            g = self.geometry
            self._consts[device] = (distance_matrix(g.grid, g.token_px).to(device),
                                    neighbourhood(g.grid, self.radius).to(device))
        return self._consts[device]

    def update(self, attn: torch.Tensor) -> None:
        """Add a batch of full maps ``(B, H, N, N)`` (B = images, or images x windows)."""
        patches, to_prefix = patch_attention(attn.detach(), self.geometry.prefix)
        expected = self.geometry.grid[0] * self.geometry.grid[1]
        if patches.shape[-1] != expected:
            raise RuntimeError(f"{self.geometry.name}: attention over {patches.shape[-1]} patch tokens, expected "
                               f"{self.geometry.grid} = {expected}")
        dist, near = self._const(patches.device)
        sums = (mean_distance(patches, dist).sum(0), locality(patches, near).sum(0), to_prefix.mean(-1).sum(0),
                patches.sum(0))
        if self.count == 0:
            self.distance, self.local, self.prefix_mass, self.mean_map = sums
        else:
            self.distance += sums[0]
            self.local += sums[1]
            self.prefix_mass += sums[2]
            self.mean_map += sums[3]
        self.cosine += float(head_cosine(patches).sum())
        self.count += patches.shape[0]

    def summary(self) -> dict:
        """Plain values for the JSON outputs (per-head lists, averaged over every map seen)."""
        g, n = self.geometry, max(self.count, 1)
        distance = (self.distance / n).tolist()
        return {
            "name": g.name, "heads": len(distance), "grid": list(g.grid), "token_px": list(g.token_px),
            "windowed": g.windowed, "maps": self.count,
            "distance_px": distance,
            "distance_spread_px": float(torch.tensor(distance).std(unbiased=False)),
            "locality": (self.local / n).tolist(),
            "cls_mass": (self.prefix_mass / n).tolist() if g.prefix else None,
            "head_cosine": self.cosine / n if len(distance) > 1 else None,  # undefined for one head
        }

    def average_map(self) -> torch.Tensor:
        """(H, P, P) patch-to-patch map averaged over every image (and window)."""
        return (self.mean_map / max(self.count, 1)).cpu()
