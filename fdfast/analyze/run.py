"""The analysis itself: load the models and images, read every attention layer, walk the loss
landscapes, write the outputs. :class:`AnalyzeOptions` is what ``fdfast-analyze`` parses."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..config.checks import need
from ..logging import log
from ..objective import normalize
from .capture import attention_layers, capture_attention
from .data import Batch, check_image_folder, load_images, resize_pixels
from .landscape import classification_loss_fn, fd_loss_fn, landscape_points, loss_landscape, teacher_fd_loss_fn
from .metrics import LayerStats
from .report import write_outputs
from .stats import CONFIDENCE, Bootstrap
from .summary import layer_intervals, model_summary
from ..interop.sources import Subject, TeacherSpec, load_subjects


@dataclass(kw_only=True)
class AnalyzeOptions:
    models: list[str] = field(default_factory=list)
    """Models to analyse (see :mod:`fdfast.interop.sources`)."""
    out: str = "analysis"
    """Output folder."""
    data: Optional[str] = None
    """ImageFolder root; None = generated images."""
    num_images: int = 64
    """Images the attention statistics average over."""
    batch_size: int = 32
    img_size: Optional[int] = None
    """Size the images are prepared at; None = the largest model input. Each model gets its own size."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N."""
    layers: Optional[list[int]] = None
    """Layers whose averaged maps are drawn; None = first, middle and last."""
    radius: int = 1
    """Locality neighbourhood: keys within this many patches of the query along both axes."""
    teacher: Optional[TeacherSpec] = None
    """A teacher to analyse and to pair with distilled students (default: each run's own teacher)."""
    with_teacher: bool = True
    """Rebuild the teachers of distilled runs (False: students only, without their FD loss)."""
    landscape: bool = True
    """Compute the loss landscapes."""
    teacher_landscape: bool = False
    """Also give each teacher a landscape: the FD loss against its own whitened tokens w.r.t. its weights."""
    landscape_images: int = 32
    """The first images of the set, on which the landscape losses are evaluated."""
    grid: int = 11
    """2-D landscape points per axis (odd: the centre is on the grid)."""
    line_points: int = 21
    """Points of the 1-D landscape slice."""
    span: float = 1.0
    """Landscape range: α, β in [-span, span] (in units of the filter-normalised directions)."""
    seed: int = 0
    """Seeds the image subset, the generated images, the landscape directions and the bootstrap."""
    bootstrap: int = 1000
    """Resamples of the images behind every 95 % interval (percentile bootstrap)."""
    min_effect: float = 0.01
    """Smallest gap, as a share of a measure's scale, that the report calls a model ahead on."""
    autoscale: bool = False
    """Let the figures' value axes zoom on the data instead of starting where the quantity does."""
    num_workers: int = 2
    """Image decoding workers."""
    trust_pickle: bool = False
    """Allow files that pickle classes beyond plain data (runs code from the file)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        need(self.num_images > 0 and self.batch_size > 0, "--num-images and --batch-size must be > 0")
        need(self.radius >= 0, f"--radius must be >= 0, got {self.radius}")
        need(self.span > 0, f"--span must be > 0, got {self.span}")
        need(self.bootstrap >= 1, f"--bootstrap must be >= 1, got {self.bootstrap}")
        need(self.min_effect >= 0, f"--min-effect must be >= 0, got {self.min_effect}")
        need(self.grid >= 2 and self.line_points >= 2, "--grid and --line-points must be >= 2")
        need(0 < self.landscape_images <= self.num_images,
             f"--landscape-images {self.landscape_images} must be in [1, --num-images {self.num_images}]")
        need(self.device in ("auto", "cpu") or self.device.startswith("cuda"),
             f"--device {self.device!r}: use auto, cpu, cuda or cuda:N")
        need(self.device in ("auto", "cpu") or torch.cuda.is_available(),
             f"--device {self.device}: no CUDA device here; use --device cpu")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def attention_statistics(subject: Subject, batches: list[Batch], device: torch.device, radius: int,
                         advance: Callable[[], None]) -> list[LayerStats]:
    """Run every batch through the model with its attention captured; one :class:`LayerStats` per layer,
    holding each image's values."""
    stats: list[LayerStats] = []
    images = [0]  # the current batch's image count: a Swin layer's maps are images x windows
    net = subject.network
    with capture_attention(net, lambda i, attn: stats[i].update(attn, images[0])) as geometries, torch.no_grad():
        stats.extend(LayerStats(g, radius) for g in geometries)
        for batch, _ in batches:
            images[0] = batch.shape[0]
            pixels = resize_pixels(batch.to(device), subject.img_size)
            net.forward_features(normalize(pixels, subject.mean, subject.std))
            advance()
    return stats


def _first_images(batches: list[Batch], n: int) -> list[Batch]:
    out, left = [], n
    for images, labels in batches:
        if left <= 0:
            break
        out.append((images[:left], labels[:left]))
        left -= images.shape[0]
    return out


def _loss_fn(subject: Subject, batches: list[Batch], device: torch.device):
    """(loss function, parameters it depends on, loss kind) of the subject's own objective; a teacher's is
    the FD loss against its own whitened tokens (``--teacher-landscape``)."""
    if subject.role == "teacher":
        fn = teacher_fd_loss_fn(subject.teacher, batches, device, eps=subject.whiten_eps, beta=subject.loss_beta)
        return fn, dict(subject.network.named_parameters()), "fd"
    if subject.loss_kind == "fd":
        fn = fd_loss_fn(subject.network, subject.arch, subject.projector, subject.teacher, batches, subject.img_size,
                        device, eps=subject.whiten_eps, beta=subject.loss_beta)
        params = {f"encoder.{n}": p for n, p in subject.network.named_parameters()}
        params.update({f"decoder.{n}": p for n, p in subject.projector.named_parameters()})
        return fn, params, "fd"
    fn = classification_loss_fn(subject.network, subject.num_classes, batches, subject.img_size, subject.mean,
                                subject.std, device)
    return fn, dict(subject.network.named_parameters()), "ce"


def _has_loss(subject: Subject, opts: AnalyzeOptions) -> bool:
    own = subject.loss_kind is not None and subject.role != "teacher"
    teacher = opts.teacher_landscape and subject.role == "teacher" and subject.teacher is not None
    return opts.landscape and (own or teacher)


def _no_landscape(subject: Subject, opts: AnalyzeOptions) -> str:
    if not opts.landscape:
        return "--no-landscape"
    if subject.role == "teacher":
        return "a teacher has no loss of its own (--teacher-landscape gives it the FD loss against its own target)"
    return "no loss of its own (a headless backbone)"


def with_intervals(models: dict, per_image: dict, landscapes: dict, opts: AnalyzeOptions) -> dict:
    """Adds each layer's ``*_ci`` entries to ``models`` and returns the per-model summaries with theirs."""
    boot = Bootstrap(opts.num_images, opts.bootstrap, opts.seed)
    land_boot = Bootstrap(opts.landscape_images, opts.bootstrap, opts.seed)
    summaries = {}
    for name, entry in models.items():
        for layer, values in zip(entry["layers"], per_image[name]):
            layer.update(layer_intervals(values, boot))
        summaries[name] = model_summary(entry["layers"], per_image[name], boot, landscapes.get(name), land_boot)
    return summaries


def _shown_layers(requested: Optional[list[int]], n: int, name: str) -> list[int]:
    chosen = requested if requested is not None else sorted({0, n // 2, n - 1})
    need(all(0 <= i < n for i in chosen), f"--layers {requested}: {name} has {n} attention layers (0..{n - 1})")
    return chosen


def analyze(opts: AnalyzeOptions) -> list[Path]:
    """Run the whole analysis; returns the files written under ``opts.out``."""
    device = resolve_device(opts.device)
    check_image_folder(opts.data)
    subjects = load_subjects(opts.models, opts.teacher, with_teacher=opts.with_teacher, trust_pickle=opts.trust_pickle)
    for s in subjects:
        for module in (s.network, s.projector, s.teacher):
            if module is not None:
                module.to(device)
    size = opts.img_size or max(s.img_size for s in subjects)
    batches = load_images(opts.data, num_images=opts.num_images, img_size=size, batch_size=opts.batch_size,
                          seed=opts.seed, num_workers=opts.num_workers)
    # everything that can be refused is checked before the long part: layers to draw, labels vs classes
    shown = {s.name: _shown_layers(opts.layers, len(attention_layers(s.network)), s.name) for s in subjects}
    losses = {s.name: _loss_fn(s, _first_images(batches, opts.landscape_images), device)
              for s in subjects if _has_loss(s, opts)}
    log(f"analysing {', '.join(f'{s.name} ({s.role})' for s in subjects)} on {opts.num_images} images "
        f"({opts.data or 'generated'}) at {size} px, device {device}")
    models, per_image, maps, landscapes, skipped = {}, {}, {}, {}, {}
    total = len(subjects) * len(batches) + len(losses) * landscape_points(opts.grid, opts.line_points)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not opts.progress, transient=True) as bar:
        task = bar.add_task("attention", total=total)
        advance = functools.partial(bar.advance, task)
        for s in subjects:
            bar.update(task, description=f"attention {s.name}")
            stats = attention_statistics(s, batches, device, opts.radius, advance)
            models[s.name] = {"role": s.role, "source": s.source, "img_size": s.img_size, "mean": list(s.mean),
                              "std": list(s.std), "layers": [st.summary() for st in stats]}
            per_image[s.name] = [st.per_image() for st in stats]
            maps[s.name] = {stats[i].geometry.name: stats[i].average_map() for i in shown[s.name]}
        for s in subjects:
            if s.name not in losses:
                skipped[s.name] = _no_landscape(s, opts)
                continue
            bar.update(task, description=f"landscape {s.name}")
            fn, params, kind = losses[s.name]
            land = loss_landscape(params, fn, span=opts.span, grid=opts.grid, line_points=opts.line_points,
                                  seed=opts.seed, on_point=advance)
            target = "its own whitened tokens" if s.role == "teacher" else None
            landscapes[s.name] = {"loss": kind, "target": target, "images": opts.landscape_images,
                                  "grid": opts.grid, **land}
    summaries = with_intervals(models, per_image, landscapes, opts)
    settings = {"images": opts.num_images, "data": opts.data or "generated images", "img_size": size,
                "radius": opts.radius, "landscape_images": opts.landscape_images, "device": str(device),
                "bootstrap": {"resamples": opts.bootstrap, "confidence": CONFIDENCE, "seed": opts.seed,
                              "min_effect": opts.min_effect}, "autoscale": opts.autoscale}
    written = write_outputs(Path(opts.out), models, summaries, per_image, maps, landscapes, skipped, settings)
    log(f"wrote {len(written)} files to {opts.out}; start with {Path(opts.out) / 'report.md'}")
    return written
