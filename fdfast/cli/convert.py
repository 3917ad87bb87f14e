"""fdfast-convert: turn an ImageFolder into FFCV ``.beton`` files (the work is in ``pipelines.ffcv_writer``).

    fdfast-convert IMAGENET_ROOT OUT_DIR            # ROOT/train, ROOT/val -> OUT_DIR/{train,val}.beton
    fdfast-convert ROOT/train out/train.beton       # one split
    fdfast-convert --check-only ROOT                # list unreadable images, write nothing

Exit codes: 0 done; 1 ``--check-only`` found unreadable images; 2 bad input (one line); 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.filesize import decimal

from pipelines import ffcv_writer as W

from .common import exit_code, int_at_least

PROG = "fdfast-convert"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Convert an ImageFolder (ROOT/train, ROOT/val, or one split "
                                "folder) into FFCV .beton files for data.backend=ffcv, with ffcv-imagenet's defaults.")
    p.add_argument("src", type=Path, help="ImageFolder root holding train/ and/or val/, or one split folder")
    p.add_argument("out", type=Path, nargs="?", help="output folder (receives <split>.beton), or a .beton path")
    p.add_argument("--check-only", action="store_true", help="only decode every image and list the unreadable "
                   "ones (exit 1 if any); for folders read directly by the torchvision / nvjpeg / DALI backends")
    p.add_argument("--splits", nargs="+", choices=W.SPLITS, help="only these splits of SRC (default: all present)")
    p.add_argument("--write-mode", default=W.DEFAULT_WRITE_MODE, choices=W.WRITE_MODES,
                   help="FFCV RGBImageField write_mode (default: %(default)s)")
    p.add_argument("--max-resolution", type=int, default=W.DEFAULT_MAX_RESOLUTION,
                   help="cap on the longer image side, 0 = keep (default: %(default)s)")
    p.add_argument("--compress-probability", type=float, default=W.DEFAULT_COMPRESS_PROBABILITY,
                   help="share stored as JPEG with --write-mode proportion (default: %(default)s)")
    p.add_argument("--jpeg-quality", type=int, default=W.DEFAULT_JPEG_QUALITY, help="(default: %(default)s)")
    p.add_argument("--num-workers", type=int_at_least(1), help="decoding / writing processes (default: all cores)")
    p.add_argument("--chunk-size", type=int_at_least(1), default=100,
                   help="images per work item (default: %(default)s)")
    p.add_argument("--max-images", type=int_at_least(1), help="only N images per split, spread over the classes")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it")
    p.add_argument("--overwrite", action="store_true", help="replace existing .beton files")
    p.add_argument("--seed", type=int, default=0, help="seed of the proportion-mode JPEG coin (default: %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out is None and not args.check_only:
        parser.error("OUT is required (an output folder or .beton path), unless --check-only")
    err, out = Console(stderr=True), Console(soft_wrap=True, highlight=False)

    def work() -> int:
        found_bad = False
        with W.stop_on_signals():        # SIGTERM (kill, a CI timeout) takes the same clean-up path as Ctrl-C
            for src, beton in W.plan_jobs(args.src, None if args.check_only else args.out, args.splits):
                if args.check_only:
                    r = W.check_folder(src, num_workers=args.num_workers, max_images=args.max_images, console=err)
                    found_bad |= bool(r.skipped)
                    out.print(f"{src}: {r.images} readable images, {len(r.skipped)} unreadable"
                              f"{' (listed above)' if r.skipped else ''}, {r.classes} classes, {r.seconds:.1f} s")
                    continue
                r = W.convert_folder(
                    src, beton, max_resolution=args.max_resolution or None, write_mode=args.write_mode,
                    compress_probability=args.compress_probability, jpeg_quality=args.jpeg_quality,
                    num_workers=args.num_workers, chunk_size=args.chunk_size, max_images=args.max_images,
                    strict=args.strict, overwrite=args.overwrite, seed=args.seed, console=err)
                extra = f", skipped {len(r.skipped)} unreadable (listed above)" if r.skipped else ""
                extra += f", ignored {r.ignored} non-image files" if r.ignored else ""
                out.print(f"{r.out}: {r.images} images, {r.classes} classes, {decimal(r.bytes)}, {r.seconds:.1f} s "
                          f"({r.images / max(r.seconds, 1e-9):.0f} img/s){extra}")
        return 1 if found_bad else 0
    return exit_code(PROG, work, label="error", interrupted="the unfinished output was removed")


if __name__ == "__main__":
    sys.exit(main())
