"""Attention statistics of spec §5, as tensor functions plus a per-image record per layer.

Every function takes attention probabilities over *patch* tokens: ``(..., P, P)`` with rows (queries)
summing to 1 over the ``P = gh * gw`` patch keys of a row-major grid. :func:`patch_attention` gets there
from a model's full map: it drops the leading prefix tokens (CLS) and renormalises each query's row over
the patch keys, so a head that parks mass on CLS is measured by where the rest of its mass goes (that CLS
mass is reported separately).

* mean attention distance: ``sum_j A_ij * |p_i - p_j|`` (patch centres in pixels), averaged over queries;
* locality ("diagonality"): the mass a query puts on keys within ``radius`` patches in both directions
  (the 2-D band around the diagonal of a row-major map); the identity map scores 1;
* head cosine: mean pairwise cosine similarity of the heads' flattened maps (1 = identical heads).

:func:`uniform_reference` gives what attention spread evenly over a grid scores on each of them.
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


def uniform_reference(geometry: "LayerGeometry", radius: int) -> dict:
    """What uniform attention (every query spreads its mass evenly over the layer's patch keys) scores on
    ``geometry``'s grid: the floor a map has to rise above before it says anything about where heads look.
    Identical heads have cosine 1 and no spread of distances."""
    dist = distance_matrix(geometry.grid, geometry.token_px)
    near = neighbourhood(geometry.grid, radius).float()
    return {"distance_px": float(dist.double().mean()), "locality": float(near.double().mean()),
            "head_cosine": 1.0, "distance_spread_px": 0.0}


@dataclass
class LayerStats:
    """One layer's statistics, kept per image (a Swin image's windows are averaged into it) so that every
    mean carries a bootstrap interval over the images, plus the summed maps for the averaged picture."""
    geometry: LayerGeometry
    radius: int = 1
    count: int = 0                            # maps seen (images, or images x windows)
    distance: list = field(default_factory=list)     # (images, H) pixel distance per batch
    local: list = field(default_factory=list)        # (images, H) locality per batch
    prefix_mass: list = field(default_factory=list)  # (images, H) mass on CLS per batch
    cosine: list = field(default_factory=list)       # (images,) mean pairwise head cosine per batch
    mean_map: Optional[torch.Tensor] = None   # (H, P, P) summed patch maps
    _consts: dict = field(default_factory=dict, repr=False)

    def _const(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._consts:
            g = self.geometry
            self._consts[device] = (distance_matrix(g.grid, g.token_px).to(device),
                                    neighbourhood(g.grid, self.radius).to(device))
        return self._consts[device]

    def update(self, attn: torch.Tensor, images: Optional[int] = None) -> None:
        """Add a batch of full maps ``(B, H, N, N)`` of ``images`` images (B = images, or images x windows
        for Swin, image-major as timm's window partition lays them out; None: one map per image)."""
        patches, to_prefix = patch_attention(attn.detach(), self.geometry.prefix)
        expected = self.geometry.grid[0] * self.geometry.grid[1]
        if patches.shape[-1] != expected:
            raise RuntimeError(f"{self.geometry.name}: attention over {patches.shape[-1]} patch tokens, expected "
                               f"{self.geometry.grid} = {expected}")
        images = images or patches.shape[0]
        if patches.shape[0] % images:
            raise RuntimeError(f"{self.geometry.name}: {patches.shape[0]} maps do not split into {images} images")
        dist, near = self._const(patches.device)

        def per_image(values: torch.Tensor) -> torch.Tensor:  # (maps, ...) -> (images, ...) window mean
            return values.reshape(images, -1, *values.shape[1:]).mean(1).double().cpu()
        self.distance.append(per_image(mean_distance(patches, dist)))
        self.local.append(per_image(locality(patches, near)))
        self.prefix_mass.append(per_image(to_prefix.mean(-1)))
        self.cosine.append(per_image(head_cosine(patches)))
        summed = patches.sum(0)
        self.mean_map = summed if self.mean_map is None else self.mean_map + summed
        self.count += patches.shape[0]

    def per_image(self) -> dict[str, torch.Tensor]:
        """float64 per-image values: ``distance_px``, ``locality``, ``cls_mass`` (images, H) and
        ``head_cosine`` (images,)."""
        return {"distance_px": torch.cat(self.distance), "locality": torch.cat(self.local),
                "cls_mass": torch.cat(self.prefix_mass), "head_cosine": torch.cat(self.cosine)}

    def summary(self) -> dict:
        """Plain values for the JSON outputs (per-head lists, averaged over every image), and the values of
        uniform attention on this layer's grid."""
        g, values = self.geometry, self.per_image()
        distance = values["distance_px"].mean(0)
        heads = distance.numel()
        return {
            "name": g.name, "heads": heads, "grid": list(g.grid), "token_px": list(g.token_px),
            "windowed": g.windowed, "maps": self.count, "images": int(values["head_cosine"].shape[0]),
            "distance_px": distance.tolist(),
            "distance_spread_px": float(distance.std(unbiased=False)),
            "locality": values["locality"].mean(0).tolist(),
            "cls_mass": values["cls_mass"].mean(0).tolist() if g.prefix else None,
            "head_cosine": float(values["head_cosine"].mean()) if heads > 1 else None,  # undefined for one head
            "uniform": uniform_reference(g, self.radius),
        }

    def average_map(self) -> torch.Tensor:
        """(H, P, P) patch-to-patch map averaged over every image (and window)."""
        return (self.mean_map / max(self.count, 1)).cpu()
