"""fdfast-analyze: FD's diagnostics (attention distance, head diversity, diagonality, loss landscape).

    fdfast-analyze runs/demo --data runs/demo/images/val --out runs/demo/analysis
    fdfast-analyze fd_clip_b16.pth --teacher ViT-B-16.pt --teacher-kind clip --data imagenet/val --out fd_vs_clip
    fdfast-analyze --teacher dinov2_vitb14_reg4_pretrain.pth --teacher-kind timm \
        --teacher-model vit_base_patch14_reg4_dinov2.lvd142m --data imagenet/val --out dinov2

Exit codes: 0 done; 2 a user-fixable error (a model, a file, an option: one line, no traceback); 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys

from ..analyze import AnalyzeOptions, analyze
from ..constants import TRUST_SWITCH
from ..errors import UserError
from .common import exit_code
from .teacher_options import add_teacher_options, teacher_spec

PROG = "fdfast-analyze"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", help="fdfast run folder / step folder / state.pt, official FD checkpoint, "
                                             "timm export folder, or random:<timm name>")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="ImageFolder root (class sub-folders of images)")
    data.add_argument("--synthetic", action="store_true", help="generated images instead (smoke tests)")
    p.add_argument("--out", required=True, help="output folder (JSON, PNG, report.md)")
    p.add_argument("--num-images", type=int, default=64,
                   help="images the statistics and their intervals average over (default 64, a seeded subset)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=None, help="image preparation size (default: largest model input)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--layers", default=None, help="comma-separated layers whose averaged maps are drawn "
                                                   "(default: first, middle, last)")
    p.add_argument("--radius", type=int, default=1, help="locality neighbourhood in patches (default 1: 3x3)")
    add_teacher_options(p)
    land = p.add_argument_group("loss landscape")
    land.add_argument("--no-landscape", action="store_true")
    land.add_argument("--landscape-images", type=int, default=None, help="default: min(32, --num-images)")
    land.add_argument("--grid", type=int, default=11, help="2-D grid points per axis")
    land.add_argument("--line-points", type=int, default=21, help="points of the 1-D slice")
    land.add_argument("--span", type=float, default=1.0, help="α, β range [-span, span]")
    land.add_argument("--teacher-landscape", action="store_true",
                      help="give each teacher a landscape too: the FD loss against its own whitened tokens")
    sure = p.add_argument_group("intervals and figures")
    sure.add_argument("--bootstrap", type=int, default=1000,
                      help="resamples of the images behind every 95%% interval (percentile bootstrap)")
    sure.add_argument("--min-effect", type=float, default=0.01,
                      help="smallest gap, as a share of a measure's scale (pixels: the uniform-attention distance; "
                           "locality, cosine: 1), that separated intervals must also show before a model is "
                           "called ahead (default 0.01; 0: the intervals alone)")
    sure.add_argument("--autoscale", action="store_true",
                      help="let the figures' value axes zoom on the data (default: from 0; shares and cosines to 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument(TRUST_SWITCH, dest="trust_pickle", action="store_true",
                   help="allow model / teacher files that pickle code (runs it: only files you trust)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def _options(a: argparse.Namespace) -> AnalyzeOptions:
    try:
        layers = [int(v) for v in a.layers.split(",")] if a.layers else None
    except ValueError:
        raise UserError(f"--layers {a.layers!r}: give comma-separated layer numbers, e.g. 0,5,11") from None
    return AnalyzeOptions(
        models=a.models, out=a.out, data=None if a.synthetic else a.data, num_images=a.num_images,
        batch_size=a.batch_size, img_size=a.img_size, device=a.device, layers=layers, radius=a.radius,
        teacher=teacher_spec(a), with_teacher=not a.no_teacher, landscape=not a.no_landscape,
        landscape_images=a.landscape_images or min(32, a.num_images), grid=a.grid, line_points=a.line_points,
        span=a.span, seed=a.seed, num_workers=a.num_workers, trust_pickle=a.trust_pickle, progress=not a.quiet,
        teacher_landscape=a.teacher_landscape, bootstrap=a.bootstrap, min_effect=a.min_effect, autoscale=a.autoscale)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)

    def work() -> int:
        analyze(_options(args))
        return 0
    return exit_code(PROG, work,
                     interrupted=f"the files already in {args.out} are complete, the rest was not written")


if __name__ == "__main__":
    sys.exit(main())
