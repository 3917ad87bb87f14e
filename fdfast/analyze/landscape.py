"""Loss landscapes (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets", filter normalisation).

Around the weights θ* of a model, two random Gaussian directions δ and η are drawn and rescaled filter by
filter: each output row of a weight tensor gets the norm of the same row of θ*, so the plot is not
dominated by the scale of individual layers. As in the paper's default, 1-D parameters (biases, norm
weights, layer-scale gammas, q/v biases) are not perturbed. The loss is evaluated at θ* + αδ (a 1-D line)
and at θ* + αδ + βη (a 2-D grid) on a fixed image subset, in eval mode (no drop path), and the weights are
restored afterwards.

The loss is the model's own: the FD loss against its teacher for a distilled student (the teacher is not
perturbed, so its targets are computed once), cross-entropy for a classifier, and on request the FD loss of
a teacher against its own whitened tokens at θ* (its landscape in the student's units). Loss functions
return each image's loss, so the report's numbers carry intervals over the images.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..constants import IMAGENET_MEAN, IMAGENET_STD
from ..errors import UserError
from ..models.student import student_tokens
from ..models.target import TeacherTarget
from ..objective import fd_loss, normalize
from .data import Batch, resize_pixels


LossValue = Union[float, torch.Tensor]  # one image's loss each (B,), or one number


class LandscapeError(UserError, ValueError):
    """A landscape that cannot be computed as asked (e.g. labels the classifier does not have)."""


def filter_normalized_direction(params: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random direction shaped like ``params``: N(0, 1) per tensor, each filter (row along dim 0) rescaled
    to the norm of the same filter of the parameter; zero for 1-D parameters."""
    direction = {}
    for name, p in params.items():
        if p.ndim <= 1:
            direction[name] = torch.zeros_like(p)
            continue
        d = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.device, p.dtype)
        d_rows, p_rows = d.reshape(d.shape[0], -1), p.reshape(p.shape[0], -1)
        scale = p_rows.norm(dim=1, keepdim=True) / d_rows.norm(dim=1, keepdim=True).clamp_min(1e-10)
        direction[name] = (d_rows * scale).reshape(p.shape)
    return direction


@torch.no_grad()
def loss_landscape(params: dict[str, nn.Parameter], loss_fn: Callable[[], LossValue], *, span: float = 1.0,
                   grid: int = 11, line_points: int = 21, seed: int = 0,
                   on_point: Optional[Callable[[], None]] = None) -> dict:
    """Evaluate ``loss_fn()`` (the loss of each image, or one number) along θ* + αδ for ``line_points``
    values of α in [-span, span], and on the ``grid`` x ``grid`` plane θ* + αδ + βη. ``params`` are perturbed
    in place and restored afterwards. Returns plain lists: ``alphas``, ``line`` (mean losses), ``betas``,
    ``plane`` (rows: β, columns: α), ``center`` (the mean loss at θ*) and ``per_image`` (each image's loss
    at θ* and at the two ends of the line, α = -span and +span: what the report's intervals resample)."""
    gen = torch.Generator().manual_seed(seed)
    theta = {n: p.detach().clone() for n, p in params.items()}
    delta = filter_normalized_direction(theta, gen)
    eta = filter_normalized_direction(theta, gen)

    def each(a: float, b: float) -> torch.Tensor:
        for n, p in params.items():
            p.copy_(theta[n] + a * delta[n] + b * eta[n])
        values = torch.as_tensor(loss_fn(), dtype=torch.float64).detach().cpu().flatten()
        if on_point is not None:
            on_point()
        return values

    def at(a: float, b: float) -> float:
        return float(each(a, b).mean())

    def axis(n: int) -> list[float]:  # exact 0 in the middle of an odd count (linspace rounds it to ~1e-16)
        return [span * (2 * i / (n - 1) - 1) for i in range(n)]
    alphas, betas = axis(line_points), axis(grid)
    try:
        center = each(0.0, 0.0)
        ends = {"minus": each(alphas[0], 0.0), "plus": each(alphas[-1], 0.0)}
        line = [float(ends["minus"].mean()), *(at(a, 0.0) for a in alphas[1:-1]), float(ends["plus"].mean())]
        plane = [[at(a, b) for a in betas] for b in betas]
    finally:
        for n, p in params.items():
            p.copy_(theta[n])
    per_image = {"center": center.tolist(), **{k: v.tolist() for k, v in ends.items()}}
    return {"span": span, "seed": seed, "center": float(center.mean()), "alphas": alphas, "line": line,
            "betas": betas, "plane": plane, "per_image": per_image}


def landscape_points(grid: int, line_points: int) -> int:
    """How many loss evaluations :func:`loss_landscape` makes (for a progress bar)."""
    return 1 + line_points + grid * grid


def _per_image_fd(pred: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """(B,) FD loss of each image: the objective's own SmoothL1 mean, one image at a time."""
    return torch.stack([fd_loss(p[None], t[None], beta) for p, t in zip(pred, target)])


def fd_loss_fn(student: nn.Module, arch: str, projector: nn.Module, teacher: nn.Module, batches: Iterable[Batch],
               img_size: int, device: torch.device, *, eps: float = 1e-5, beta: float = 2.0
               ) -> Callable[[], torch.Tensor]:
    """FD loss of each image (SmoothL1 vs the whitened teacher tokens, spec §1.5) of ``student`` +
    ``projector`` over ``batches``; the teacher targets are computed once, since only the student moves."""
    target_fn = TeacherTarget(teacher, eps).to(device)
    inputs, targets = [], []
    for images, _ in batches:
        pixels = resize_pixels(images.to(device), img_size)
        inputs.append(normalize(pixels, IMAGENET_MEAN, IMAGENET_STD))
        targets.append(target_fn(pixels))

    def loss() -> torch.Tensor:
        # the target's plan picks the student tokens it faces (no CLS for a SigLIP teacher)
        return torch.cat([_per_image_fd(target_fn.student_tokens(projector(student_tokens(student, arch, x))), t, beta)
                          for x, t in zip(inputs, targets)])
    return loss


def teacher_fd_loss_fn(teacher: nn.Module, batches: Iterable[Batch], device: torch.device, *, eps: float = 1e-5,
                       beta: float = 2.0) -> Callable[[], torch.Tensor]:
    """FD loss of each image for a teacher (a :class:`~fdfast.models.teachers.Teacher`) against its own
    target: its whitened tokens at θ, compared with its whitened tokens at the weights it was loaded with
    (computed once). The teacher is the perfect student of itself, so the loss is 0 at θ* and the landscape
    says how fast its own output moves away, in the units of the FD loss."""
    target_fn = TeacherTarget(teacher, eps).to(device)
    pixels = [images.to(device) for images, _ in batches]
    targets = [target_fn(x).clone() for x in pixels]

    def loss() -> torch.Tensor:
        return torch.cat([_per_image_fd(target_fn(x), t, beta) for x, t in zip(pixels, targets)])
    return loss


def classification_loss_fn(model: nn.Module, num_classes: int, batches: Iterable[Batch], img_size: int,
                           mean: tuple, std: tuple, device: torch.device) -> Callable[[], torch.Tensor]:
    """Cross-entropy of each image, a classifier's logits against the batches' labels (ImageFolder class indices:
    the folder must hold the classes the model was fine-tuned on, in the same sorted order)."""
    data = [(normalize(resize_pixels(images.to(device), img_size), mean, std), labels.to(device))
            for images, labels in batches]
    top = max(int(labels.max()) for _, labels in data)
    if top >= num_classes:
        raise LandscapeError(f"the images carry class {top} but the classifier has {num_classes} classes: pass "
                             "--data with the classes it was fine-tuned on, or --no-landscape")

    def loss() -> torch.Tensor:
        return torch.cat([F.cross_entropy(model(x).float(), y, reduction="none") for x, y in data])
    return loss
