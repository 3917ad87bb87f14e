"""Generate a small ImageFolder of synthetic JPEGs (demo data and tests; no downloads).

Images are smooth colour gradients with a class-dependent pattern, so a model can learn something
from them and JPEG decoders of different backends agree closely on them.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from fdfast.files import make_folder
from fdfast.errors import UserError


def _image(rng: np.random.Generator, cls: int, h: int, w: int) -> np.ndarray:
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    freq = 1 + cls % 5
    phase = rng.uniform(0, 2 * np.pi, size=3)
    base = np.stack([
        0.5 + 0.5 * np.sin(2 * np.pi * freq * xx + phase[0]),
        0.5 + 0.5 * np.sin(2 * np.pi * freq * yy + phase[1]),
        0.5 + 0.5 * np.cos(2 * np.pi * (xx + yy) * (1 + cls % 3) + phase[2]),
    ], axis=-1)
    tint = (np.arange(3) == cls % 3) * 0.25
    img = np.clip(base * 0.75 + tint + rng.normal(0, 0.02, size=(h, w, 3)), 0, 1)
    return (img * 255).astype(np.uint8)


def make_image_folder(
    root: str | os.PathLike,
    num_classes: int = 4,
    per_class: int = 16,
    sizes: tuple[tuple[int, int], ...] = ((96, 128), (160, 120), (256, 300), (64, 64)),
    seed: int = 0,
    grayscale_every: int = 0,
    rgba_every: int = 0,
    corrupt: int = 0,
    quality: int = 90,
) -> Path:
    """Write ``root/class_xxx/img_yyyy.jpg``; returns ``root``.

    ``grayscale_every=k`` saves every k-th image as single-channel JPEG; ``rgba_every=k`` saves every
    k-th as an RGBA PNG; ``corrupt=n`` adds n truncated ``.jpg`` files to the first class.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    n = 0
    for c in range(num_classes):
        d = make_folder(root / f"class_{c:03d}")
        for i in range(per_class):
            h, w = sizes[(c * per_class + i) % len(sizes)]
            arr = _image(rng, c, h, w)
            n += 1
            if rgba_every and n % rgba_every == 0:
                alpha = np.full((h, w, 1), 255, np.uint8)
                Image.fromarray(np.concatenate([arr, alpha], -1), "RGBA").save(d / f"img_{i:04d}.png")
            elif grayscale_every and n % grayscale_every == 0:
                Image.fromarray(arr.mean(-1).astype(np.uint8), "L").save(d / f"img_{i:04d}.jpg", quality=quality)
            else:
                Image.fromarray(arr, "RGB").save(d / f"img_{i:04d}.jpg", quality=quality)
    for j in range(corrupt):
        good = root / "class_000" / "img_0000.jpg"
        data = good.read_bytes() if good.exists() else b"\xff\xd8\xff"
        (root / "class_000" / f"corrupt_{j}.jpg").write_bytes(data[: max(16, len(data) // 10)])
    return root


def make_demo_data(root: str | os.PathLike, num_classes: int = 8, seed: int = 0) -> Path:
    """The demo's data set: ``root/train`` (64 images per class) and ``root/val`` (16 per class).
    Folders that already exist are kept as they are."""
    root = Path(root)
    for i, (split, per_class) in enumerate((("train", 64), ("val", 16))):
        if not (root / split).exists():
            make_image_folder(root / split, num_classes=num_classes, per_class=per_class, seed=seed + i)
    return root


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m pipelines.generate",
                                description="Write a synthetic JPEG ImageFolder (demo data; no downloads).")
    p.add_argument("root", help="output folder")
    p.add_argument("--demo", action="store_true",
                   help="the demo layout: ROOT/train (8 classes x 64) and ROOT/val (8 x 16), kept if present")
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--per-class", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        if args.demo:
            out = make_demo_data(args.root, num_classes=args.classes, seed=args.seed)
        else:
            out = make_image_folder(args.root, num_classes=args.classes, per_class=args.per_class, seed=args.seed)
    except UserError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
