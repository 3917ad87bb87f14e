"""PHI-S (fdfast.models.phi_s): on synthetic anisotropic data every channel comes out centred with unit variance and
the map is one rotation times one scalar (its covariance is the input's, rotated, over one scalar), for a power-of-two
width, widths with a Sylvester x Paley Hadamard matrix and widths without one (the plane-rotation fallback); the
estimate over two ranks is the estimate over their data together, bit-identical on both ranks."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fdfast.models.phi_s import PhiS, PhiSEstimate, balancing_rotation, hadamard, phi_s_map


def _anisotropic(dim: int, n: int, seed: int = 0) -> torch.Tensor:
    """n samples of a correlated Gaussian whose axis variances span 1e-4 .. 1e2, with a large mean."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    scales = torch.logspace(-2, 1, dim, dtype=torch.float64)
    z = torch.randn(n, dim, generator=g, dtype=torch.float64)
    return 50.0 + torch.randn(dim, generator=g, dtype=torch.float64) + (z * scales) @ q.T


@pytest.mark.parametrize("dim", [64, 48, 20, 6, 90])  # 2^6; 4 x Paley I (12); Paley I (20); no Hadamard: 6, 90
def test_every_channel_gets_unit_variance_from_one_rotation_and_one_scalar(dim):
    x = _anisotropic(dim, 4000)
    est = PhiSEstimate()
    for chunk in x.split(1000):  # batches, as the trainer feeds them
        est.add(chunk.view(10, 100, dim))
    phi = PhiS(dim).double()
    est.finish(phi)
    assert int(phi.tokens) == 4000
    y = phi(x.float()).double()  # the module computes in fp32
    cov_x = torch.cov(x.T, correction=0)
    w = phi.transform.double()
    alpha = float(phi.scale)
    assert alpha ** 2 == pytest.approx(float(cov_x.trace()) / dim, rel=1e-9)  # one scalar: sqrt(mean eigenvalue)
    torch.testing.assert_close(w @ w.T * alpha ** 2, torch.eye(dim, dtype=torch.float64), atol=1e-6, rtol=0)
    cov_w = w @ cov_x @ w.T  # the covariance of W (x - mean), computed in float64
    torch.testing.assert_close(cov_w.diagonal(), torch.ones(dim, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(torch.linalg.eigvalsh(cov_w) * alpha ** 2, torch.linalg.eigvalsh(cov_x), atol=1e-8,
                               rtol=1e-8)  # identity up to one scalar after the rotation: the spectrum is kept
    torch.testing.assert_close(y.mean(0), torch.zeros(dim, dtype=torch.float64), atol=2e-4, rtol=0)
    torch.testing.assert_close(y.var(0, unbiased=False), torch.ones(dim, dtype=torch.float64), atol=2e-3, rtol=0)


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 44, 48, 60, 72, 96, 384, 768, 1152, 1280])
def test_hadamard_matrices_for_powers_of_two_and_sylvester_times_paley(n):
    h = hadamard(n)
    assert h is not None and bool(((h == 1) | (h == -1)).all())
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_widths_without_a_construction_use_the_exact_plane_rotations():
    assert hadamard(6) is None and hadamard(90) is None and hadamard(92) is None  # 92 exists, but not as Paley
    lam = torch.rand(90, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) ** 4
    r = balancing_rotation(lam)
    torch.testing.assert_close(r @ r.T, torch.eye(90, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close((r @ torch.diag(lam) @ r.T).diagonal(), lam.mean().expand(90), atol=1e-12, rtol=0)
    again = balancing_rotation(lam)
    assert torch.equal(r, again)  # deterministic: no random seed involved


def test_a_low_rank_teacher_is_not_amplified():
    """Rank 3 in 16 channels (the paper's case against full whitening): finite map, unit channel variance."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2000, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 16, generator=g, dtype=torch.float64)
    mean, w, alpha = phi_s_map(x.mean(0), torch.cov(x.T, correction=0))
    assert torch.isfinite(w).all() and float(alpha) > 0
    cov_y = w @ torch.cov(x.T, correction=0) @ w.T
    torch.testing.assert_close(cov_y.diagonal(), torch.ones(16, dtype=torch.float64), atol=1e-9, rtol=0)


def test_the_map_stays_fp32_under_bf16_autocast():
    phi = PhiS(8)
    phi.set(torch.randn(8), torch.randn(8, 8), torch.tensor(2.0), 5)
    x = torch.randn(2, 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = phi(x.bfloat16())
    assert y.dtype == torch.float32
    assert torch.equal(y, (x.bfloat16().float() - phi.mean) @ phi.transform.T)


def _rank(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    x = _anisotropic(12, 3000, seed=3)
    est = PhiSEstimate()
    for chunk in x[rank * 1500:(rank + 1) * 1500].split(500):  # each rank its own shard, shifted differently
        est.add(chunk.view(5, 100, 12))
    phi = PhiS(12).double()
    est.finish(phi, rank=rank)
    torch.save(phi.state_dict(), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_estimate_one_map_from_their_data_together(tmp_path):
    init = f"file://{tmp_path / 'store'}"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    s0, s1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k in s0:
        assert torch.equal(s0[k], s1[k]), f"ranks disagree on {k}"
    x = _anisotropic(12, 3000, seed=3)
    one = PhiSEstimate()
    one.add(x.view(30, 100, 12))
    phi = PhiS(12).double()
    one.finish(phi)
    assert int(s0["tokens"]) == 3000
    torch.testing.assert_close(s0["mean"], phi.mean, atol=1e-10, rtol=0)
    torch.testing.assert_close(s0["scale"], phi.scale, atol=0, rtol=1e-10)
    torch.testing.assert_close(s0["transform"].abs(), phi.transform.abs(), atol=1e-6, rtol=0)  # eigenvector signs
