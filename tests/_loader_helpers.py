"""Shared pieces of the loader and converter tests: building a loader from a ``data`` section, generated
folders whose pixels can be checked (and photo-like ones, and damaged ones), a torchvision reference for
evaluation crops, and measurements of what a training crop did."""
from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from fdfast.config.data import DataConfig
from fdfast.distributed import shutdown
from pipelines import build_loader, check_batch
from pipelines.generate import make_image_folder

CPU = torch.device("cpu")


def make_loader(backend: str, path, *, train: bool = True, batch_size: int = 8, img_size: int = 32, device=CPU,
                rank: int = 0, world_size: int = 1, seed: int = 0, **data):
    """``pipelines.build_loader`` for ``path`` (as data.train and data.val) with the other ``data`` fields."""
    cfg = DataConfig(backend=backend, train=str(path), val=str(path), **data)
    return build_loader(cfg, train=train, batch_size=batch_size, img_size=img_size, device=device, rank=rank,
                        world_size=world_size, seed=seed)

# Mixed folder: sizes above and below the 224 crop, portrait and landscape, grayscale JPEGs, RGBA PNGs.
MIXED_SIZES = ((96, 128), (160, 120), (256, 300), (64, 64), (300, 230))


def make_mixed_folder(root: Path, corrupt: int = 0) -> Path:
    """4 classes x 10 images of MIXED_SIZES, every 7th grayscale, every 9th an RGBA PNG."""
    return make_image_folder(root, num_classes=4, per_class=10, sizes=MIXED_SIZES, grayscale_every=7,
                             rgba_every=9, corrupt=corrupt)


# Coordinate folder: R encodes the column, G the row, B the image id, so that a crop tells which image
# it came from, which source window it covers and whether it was mirrored.
COORD_W, COORD_H = 320, 240
COORD_CLASSES, COORD_PER_CLASS = 8, 8
ID_STEP = 4   # B = ID_STEP * id + 2: 64 ids in 0..255 with margin for JPEG / resampling noise


def make_coordinate_folder(root: Path) -> Path:
    xs = np.linspace(0, 255, COORD_W)
    ys = np.linspace(0, 255, COORD_H)
    n = 0
    for c in range(COORD_CLASSES):
        d = Path(root) / f"c{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(COORD_PER_CLASS):
            img = np.empty((COORD_H, COORD_W, 3), np.uint8)
            img[..., 0] = np.round(xs)[None, :]
            img[..., 1] = np.round(ys)[:, None]
            img[..., 2] = ID_STEP * n + 2
            Image.fromarray(img).save(d / f"i{i:02d}.png")
            n += 1
    return Path(root)


# Photo-like test images: smooth colour fields, sharp-edged shapes, fine grain; JPEG q90 at the
# commonest ImageNet shapes (w x h) and two others.
PHOTO_SHAPES = ((500, 375), (375, 500), (333, 500), (500, 500), (640, 480))


def _photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    small = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    grain = rng.normal(0, 12, size=(h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img.filter(ImageFilter.GaussianBlur(1.2))) + grain, 0, 255)
                           .astype(np.uint8))


def make_photo_folder(root: Path, per_shape: int = 2) -> Path:
    """One class folder of ``per_shape`` photo-like JPEGs per PHOTO_SHAPES entry."""
    rng = np.random.default_rng(0)
    d = Path(root) / "photos"
    d.mkdir(parents=True, exist_ok=True)
    for w, h in PHOTO_SHAPES:
        for i in range(per_shape):
            _photo(rng, w, h).save(d / f"{w}x{h}_{i}.jpg", quality=90)
    return Path(root)


# A folder with the three kinds of damage the loaders meet: a truncated JPEG, an empty file, a text file
# named .jpg (sorted names: they sit among the good files of both classes).
BAD_NAMES = ("class_000/img_0002b_truncated.jpg", "class_001/img_0001b_empty.jpg", "class_001/img_0003b_text.jpg")


def make_damaged_folder(root: Path, per_class: int = 6) -> Path:
    make_image_folder(root, num_classes=2, per_class=per_class, sizes=((48, 40), (40, 56)))
    data = (Path(root) / "class_000" / "img_0000.jpg").read_bytes()
    for name, content in zip(BAD_NAMES, (data[:len(data) // 2], b"", b"this is text, not a JPEG\n")):
        (Path(root) / name).write_bytes(content)
    return Path(root)


def image_ids(images: torch.Tensor) -> list[int]:
    """Image ids of a batch from the coordinate folder (sorted class, file order = id)."""
    b = images[:, 2].float().mean(dim=(1, 2)).cpu()
    return [int(v) for v in torch.round((b - 2) / ID_STEP)]


def crop_geometry(img: torch.Tensor) -> dict:
    """From one (3, S, S) crop of a coordinate image: area fraction and aspect ratio of the source
    window, and whether it was flipped horizontally."""
    x = img.float().cpu()
    s = x.shape[-1]
    r = x[0].mean(0)           # column profile of the column-coordinate channel
    g = x[1].mean(1)           # row profile of the row-coordinate channel
    flipped = bool(r[-1] < r[0])
    if flipped:
        r = r.flip(0)
    # first/last output pixel centres sit half an output pixel inside the window: scale by s/(s-1)
    w = float(r[-1] - r[0]) / 255 * (COORD_W - 1) * s / (s - 1)
    h = float(g[-1] - g[0]) / 255 * (COORD_H - 1) * s / (s - 1)
    return {"area": w * h / (COORD_W * COORD_H), "ratio": w / h, "flipped": flipped}


def reference_eval_crops(paths: list[str], size: int = 224, resize: int = 256,
                         interpolation: str = "bilinear") -> torch.Tensor:
    """torchvision's Resize(shorter side -> resize) + CenterCrop(size) on PIL RGB: (N, 3, S, S) uint8."""
    from torchvision import transforms as T

    mode = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[interpolation]
    tf = T.Compose([T.Resize(resize, interpolation=mode), T.CenterCrop(size), T.PILToTensor()])
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(tf(im.convert("RGB")))
    return torch.stack(out)


def match_to_reference(images: torch.Tensor, reference: torch.Tensor) -> tuple[list[int], list[float]]:
    """For each image, the index of the closest reference crop and the mean absolute difference to it."""
    a = images.float().flatten(1)
    b = reference.float().flatten(1)
    d = torch.cdist(a, b, p=1) / a.shape[1]
    best = d.argmin(dim=1)
    return best.tolist(), d[torch.arange(len(a)), best].tolist()


def collect(loader) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """One pass: all images (cloned: loaders reuse their buffers), all labels, and the batch sizes."""
    imgs, labels, sizes = [], [], []
    for x, y in loader:
        imgs.append(x.clone())
        labels.append(y.clone())
        sizes.append(int(x.shape[0]))
    return torch.cat(imgs), torch.cat(labels), sizes


def ffcv_rank_worker(rank: int, world: int, init_file: str, beton: str, out_dir: str) -> None:
    """One rank of a gloo process group: FFCV training loader with distributed=True; saves the image ids
    it read in two epochs (and its len) to ``out_dir/rank{rank}.pt``."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        loader = make_loader("ffcv", beton, rank=rank, world_size=world, seed=3, num_workers=1)
        result = {"len": len(loader), "epochs": []}
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            ids = []
            for images, labels in loader:
                check_batch(images, labels)
                ids += image_ids(images)
            result["epochs"].append(ids)
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        shutdown()  # a barrier, then the group goes


@contextlib.contextmanager
def hang_guard(message: str, seconds: int = 60):
    """Fail the block with ``TimeoutError(message)`` instead of hanging the test run (SIGALRM)."""
    def hung(*_):
        raise TimeoutError(message)

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def hide_package(monkeypatch, package: str) -> None:
    """Make ``import package`` (and of any of its already-imported submodules) raise ImportError."""
    import sys

    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")] + [package]:
        monkeypatch.setitem(sys.modules, name, None)
