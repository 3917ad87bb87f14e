"""fdfast-analyze: FD's diagnostics (attention distance, head diversity, diagonality, loss landscape).

    fdfast-analyze runs/demo --data runs/demo/images/val --out runs/demo/analysis
    fdfast-analyze fd_clip_b16.pth --teacher ViT-B-16.pt --teacher-kind clip --data imagenet/val --out fd_vs_clip

Exit codes: 0 done; 2 a user-fixable error (a model, a file, an option: one line, no traceback); 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys

import yaml

from ..analyze import AnalyzeOptions, analyze
from ..config.load import yaml_error_line
from ..constants import TRUST_SWITCH
from ..interop.sources import TeacherSpec
from ..errors import UserError
from ..models.teachers import TEACHER_KINDS
from .common import exit_code

PROG = "fdfast-analyze"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", help="fdfast run folder / step folder / state.pt, official FD checkpoint, "
                                             "timm export folder, or random:<timm name>")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="ImageFolder root (class sub-folders of images)")
    data.add_argument("--synthetic", action="store_true", help="generated images instead (smoke tests)")
    p.add_argument("--out", required=True, help="output folder (JSON, PNG, report.md)")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=None, help="image preparation size (default: largest model input)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--layers", default=None, help="comma-separated layers whose averaged maps are drawn "
                                                   "(default: first, middle, last)")
    p.add_argument("--radius", type=int, default=1, help="locality neighbourhood in patches (default 1: 3x3)")
    t = p.add_argument_group("teacher (a release file, as model.teacher of a config)")
    t.add_argument("--teacher", help="teacher weights file or 'random'; also the FD-loss partner of distilled "
                                     "students (default: a run's own model.teacher)")
    t.add_argument("--teacher-kind", choices=TEACHER_KINDS, default="clip")
    t.add_argument("--teacher-model", default=TeacherSpec.model, help="timm architecture of the teacher")
    t.add_argument("--teacher-kwargs", default=None, help="YAML/JSON mapping of extra timm arguments, "
                                                          "e.g. '{window_size: 14}' for EsViT")
    t.add_argument("--teacher-img-size", type=int, default=None, help="teacher input size (default 224)")
    t.add_argument("--no-teacher", action="store_true", help="do not rebuild the runs' own teachers")
    land = p.add_argument_group("loss landscape")
    land.add_argument("--no-landscape", action="store_true")
    land.add_argument("--landscape-images", type=int, default=None, help="default: min(32, --num-images)")
    land.add_argument("--grid", type=int, default=11, help="2-D grid points per axis")
    land.add_argument("--line-points", type=int, default=21, help="points of the 1-D slice")
    land.add_argument("--span", type=float, default=1.0, help="α, β range [-span, span]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument(TRUST_SWITCH, dest="trust_pickle", action="store_true",
                   help="allow model / teacher files that pickle code (runs it: only files you trust)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def _options(a: argparse.Namespace) -> AnalyzeOptions:
    teacher = None
    if a.teacher:
        try:
            kwargs = yaml.safe_load(a.teacher_kwargs) if a.teacher_kwargs else None
        except yaml.YAMLError as e:  # bad syntax, or a tag such as !!python/object that safe_load refuses
            raise UserError(f"--teacher-kwargs {a.teacher_kwargs!r} is not valid YAML ({yaml_error_line(e)}); give "
                            "a mapping, e.g. '{window_size: 14}'") from None
        if kwargs is not None and not isinstance(kwargs, dict):
            raise UserError(f"--teacher-kwargs {a.teacher_kwargs!r} is not a mapping, e.g. '{{window_size: 14}}'")
        teacher = TeacherSpec(weights=a.teacher, kind=a.teacher_kind, model=a.teacher_model, model_kwargs=kwargs,
                              img_size=a.teacher_img_size)
    try:
        layers = [int(v) for v in a.layers.split(",")] if a.layers else None
    except ValueError:
        raise UserError(f"--layers {a.layers!r}: give comma-separated layer numbers, e.g. 0,5,11") from None
    return AnalyzeOptions(
        models=a.models, out=a.out, data=None if a.synthetic else a.data, num_images=a.num_images,
        batch_size=a.batch_size, img_size=a.img_size, device=a.device, layers=layers, radius=a.radius,
        teacher=teacher, with_teacher=not a.no_teacher, landscape=not a.no_landscape,
        landscape_images=a.landscape_images or min(32, a.num_images), grid=a.grid, line_points=a.line_points,
        span=a.span, seed=a.seed, num_workers=a.num_workers, trust_pickle=a.trust_pickle, progress=not a.quiet)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)

    def work() -> int:
        analyze(_options(args))
        return 0
    return exit_code(PROG, work,
                     interrupted=f"the files already in {args.out} are complete, the rest was not written")


if __name__ == "__main__":
    sys.exit(main())
