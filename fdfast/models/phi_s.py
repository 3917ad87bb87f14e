"""PHI-S: one affine map that standardises a teacher's tokens isotropically (Ranzinger et al. 2024, "PHI-S:
Distribution Balancing for Label-Free Multi-Teacher Distillation").

With the mean μ and the covariance Σ = U diag(λ) Uᵀ of a teacher's target tokens (C channels)::

    y = R Uᵀ (x - μ) / α,   α = sqrt(mean(λ))

``Uᵀ`` rotates onto the principal axes (covariance diag(λ)); ``R`` is an orthogonal matrix whose rotation spreads
every axis' variance evenly over the channels, so that every channel of ``R diag(λ) Rᵀ`` has the variance
mean(λ); the one scalar α then makes it 1. Unlike full whitening (divide each axis by its own sqrt(λ)), the
map is a rotation and one scale: a low-variance (noise) axis is not amplified and the map is inverted exactly
(``x = μ + α U Rᵀ y``), which is why the paper prefers it for several teachers. Every channel of every teacher
then has unit variance, so their SmoothL1 losses are on one scale. The covariance of ``y`` is
``R diag(λ) Rᵀ / α²``: unit diagonal, the same eigenvalues as Σ up to the one scalar 1/α².

``R`` is the normalised Hadamard matrix H/sqrt(C) (H of ±1 entries, H Hᵀ = C I, so every |R_ij|² = 1/C and the
spread is even for every λ), as in the paper. Hadamard matrices exist only for C = 1, 2 or a multiple of 4;
:func:`hadamard` builds them as Sylvester 2^k ⊗ Paley: Paley I (order q + 1, q a prime ≡ 3 mod 4) or Paley II
(order 2(q + 1), q a prime ≡ 1 mod 4). That covers every ViT width in use (384 = 32·12, 768 = 64·12,
1024 = 2^10, 1152 = 16·72, 1280 = 64·20, 1536 = 128·12, ...). For a width it does not cover (e.g. 6 or 90) no
fixed matrix spreads every spectrum evenly, so :func:`balancing_rotation` builds, for the estimated λ, a
product of at most C - 1 plane (Givens) rotations that sets the diagonal of R diag(λ) Rᵀ to mean(λ) one channel
at a time (the constructive step of the Schur-Horn theorem): deterministic (no random seed) and exact to
float64 rounding, where a random orthogonal matrix would balance the channels only approximately.

The statistics come from the first ``model.phi_s_batches`` batches of a run (every rank's batches, summed in
float64 across ranks; rank 0 solves the eigenproblem and every rank receives its result, so the map is
bit-identical everywhere); :class:`PhiS` holds the map as buffers that a checkpoint stores and a resume loads.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from ..distributed import all_reduce_sum, broadcast_object

__all__ = ["PhiS", "PhiSEstimate", "balancing_rotation", "hadamard", "phi_s_map"]


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q_ij = χ(j - i) (Legendre symbol mod the prime q, χ(0) = 0)."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley(m: int) -> Optional[torch.Tensor]:
    """A Hadamard matrix of order ``m`` by Paley's constructions, or None when neither applies to ``m``."""
    q = m - 1
    if _is_prime(q) and q % 4 == 3:  # Paley I: H = I + [[0, 1ᵀ], [-1, Q]] (Q skew-symmetric)
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return torch.eye(m, dtype=torch.float64) + s
    q = m // 2 - 1
    if m % 2 == 0 and _is_prime(q) and q % 4 == 1:  # Paley II from the symmetric conference matrix [[0, 1ᵀ], [1, Q]]
        c = torch.zeros(m // 2, m // 2, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        sign = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, sign) + torch.kron((c == 0).double(), zero)
    return None


def hadamard(n: int) -> Optional[torch.Tensor]:
    """An n x n matrix of ±1 (float64) with H Hᵀ = n I: Sylvester 2^k ⊗ (1 or a Paley matrix), the smallest Paley
    factor that divides n; None when no such construction has order n."""
    k = 0
    while n % (2 ** (k + 1)) == 0:
        k += 1
    for a in range(k, -1, -1):  # the largest power of two first: the Paley factor stays small
        m = n // 2 ** a
        base = torch.ones(1, 1, dtype=torch.float64) if m == 1 else _paley(m)
        if base is None:
            continue
        h = base
        for _ in range(a):
            h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
        return h
    return None


def balancing_rotation(eigenvalues: torch.Tensor) -> torch.Tensor:
    """An orthogonal R (float64) with every diagonal entry of R diag(λ) Rᵀ equal to mean(λ), from plane rotations.

    Each rotation, in the plane of a channel above the mean (a) and one below it (b), with off-diagonal c, sets
    the first to the mean: a cos²θ + b sin²θ + 2c sinθcosθ runs from a to b as θ goes from 0 to π/2, so it
    passes the mean; that channel is then never rotated again, and the trace is kept."""
    lam = eigenvalues.detach().to(torch.float64).cpu().numpy()
    n = lam.size
    target = float(lam.mean())
    m = np.diag(lam)
    r = np.eye(n)
    tol = 1e-12 * max(1.0, float(np.abs(lam).max()))
    done = np.zeros(n, dtype=bool)
    while True:
        d = m.diagonal()
        above = np.flatnonzero(~done & (d > target + tol))
        below = np.flatnonzero(~done & (d < target - tol))
        if not above.size or not below.size:
            break
        i, j = int(above[0]), int(below[0])
        a, b, c = m[i, i], m[j, j], m[i, j]
        half = (a - b) / 2
        theta = (math.atan2(c, half) + math.acos(np.clip((target - (a + b) / 2) / math.hypot(half, c), -1, 1))) / 2
        cos, sin = math.cos(theta), math.sin(theta)
        # G M Gᵀ and G R for the rotation G of rows i, j: O(C) per step, O(C²) in all
        for rows in (m, r):
            rows[[i, j]] = np.stack([cos * rows[i] + sin * rows[j], cos * rows[j] - sin * rows[i]])
        m[:, [i, j]] = np.stack([cos * m[:, i] + sin * m[:, j], cos * m[:, j] - sin * m[:, i]], axis=1)
        m[i, i] = target  # exact up to rounding; pin it so the channel counts as done
        done[i] = True
    return torch.from_numpy(r)


def phi_s_map(mean: torch.Tensor, cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(μ, W, α) of PHI-S for a mean and covariance (float64): y = W (x - μ), W = R Uᵀ / α."""
    cov = (cov.detach().to(torch.float64).cpu() + cov.detach().to(torch.float64).cpu().T) / 2
    lam, u = torch.linalg.eigh(cov)
    lam = lam.clamp_min(0.0)  # rounding can leave tiny negative eigenvalues of a low-rank covariance
    dim = lam.numel()
    alpha = lam.mean().sqrt().clamp_min(1e-12)
    h = hadamard(dim)
    rot = h / math.sqrt(dim) if h is not None else balancing_rotation(lam)
    return mean.detach().to(torch.float64).cpu(), rot @ u.T / alpha, alpha


class PhiS(nn.Module):
    """PHI-S of one teacher: ``forward(tokens (B, N, C)) -> float32 (tokens - mean) @ transformᵀ``.

    Buffers (in the task's checkpoint state): ``mean`` (C), ``transform`` (C, C: R Uᵀ / α), ``scale`` (α) and
    ``tokens`` (how many tokens the estimate saw; 0 = not estimated yet, identity map). They are filled in place,
    so a compiled or CUDA-graph captured target that holds their addresses sees the estimate."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("transform", torch.eye(dim))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("tokens", torch.zeros((), dtype=torch.int64))

    @property
    def ready(self) -> bool:
        return bool(self.tokens > 0)

    @torch.no_grad()
    def set(self, mean: torch.Tensor, transform: torch.Tensor, scale: torch.Tensor, tokens: int) -> None:
        self.mean.copy_(mean)
        self.transform.copy_(transform)
        self.scale.copy_(scale)
        self.tokens.fill_(int(tokens))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # fp32 whatever the surrounding autocast: a bf16 matmul would round the target to 3 significant digits
        # (with train.tf32 the fp32 matmul runs as TF32 on CUDA: ~1e-3 relative, far below the loss's residuals)
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            return (tokens.float() - self.mean) @ self.transform.T

    def extra_repr(self) -> str:
        return f"dim={self.mean.numel()}, tokens={int(self.tokens)}"


class PhiSEstimate:
    """Running float64 sums of a teacher's target tokens, for :meth:`finish` into a :class:`PhiS`.

    Tokens are summed relative to the first batch's mean, so that channels with a large mean (DINOv2's massive
    activations) lose nothing to cancellation in E[xxᵀ] - μμᵀ."""

    def __init__(self) -> None:
        self.shift: Optional[torch.Tensor] = None
        self.s1: Optional[torch.Tensor] = None
        self.s2: Optional[torch.Tensor] = None
        self.count = 0

    @torch.no_grad()
    def add(self, tokens: torch.Tensor) -> None:
        x = tokens.detach().reshape(-1, tokens.shape[-1]).to(torch.float64)
        if self.shift is None:
            self.shift = x.mean(0)
            self.s1 = torch.zeros_like(self.shift)
            self.s2 = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        x = x - self.shift
        self.s1 += x.sum(0)
        self.s2 += x.T @ x
        self.count += x.shape[0]

    @torch.no_grad()
    def finish(self, phi_s: PhiS, rank: int = 0) -> None:
        """Sum over ranks, solve on rank 0, fill ``phi_s`` identically on every rank (a collective)."""
        if self.s1 is None or self.s2 is None or self.shift is None:
            raise RuntimeError("PHI-S: no batch was seen")
        # every rank shifted by its own first batch: sum unshifted first moments around rank 0's shift instead
        shift = self.shift
        ref = broadcast_object(shift.cpu()).to(shift.device)
        delta = shift - ref
        s1 = self.s1 + self.count * delta
        cross = torch.outer(self.s1, delta)
        s2 = self.s2 + cross + cross.T + self.count * torch.outer(delta, delta)
        n = torch.tensor(float(self.count), dtype=torch.float64, device=s1.device)
        s1, s2, n = all_reduce_sum(s1), all_reduce_sum(s2), all_reduce_sum(n)
        centred = s1 / n
        cov = s2 / n - torch.outer(centred, centred)
        result = phi_s_map(ref + centred, cov) if rank == 0 else None
        mean, transform, alpha = broadcast_object(result)
        phi_s.set(mean.to(phi_s.mean.device, phi_s.mean.dtype), transform.to(phi_s.transform.device,
                  phi_s.transform.dtype), alpha.to(phi_s.scale.dtype), int(n.item()))
