"""fdfast-eval: top-1 / top-5 of classifiers on a validation set, exactly counted (under torchrun too).

    fdfast-eval runs/ft_clip_vit_base_300ep --data /data/imagenet/val
    fdfast-eval runs/ft/best exported/ft_clip_b16/ ft_official.pth --data /data/imagenet/val --json val.json
    fdfast-eval --knn --knn-train /data/imagenet/train --knn-per-class 100 runs/fd_clip --data /data/imagenet/val

A model is an fdfast fine-tune run folder, checkpoint or ``best/`` folder (evaluated with the run's own
``data.eval_resize`` and ``train.eval_norm``), a timm export folder (its ``pretrained_cfg``), or an
official FD fine-tuned checkpoint (architecture read from the tensors, ImageNet normalisation). ``--knn``
measures the weighted k-NN accuracy of any model's features instead (``fdfast.tasks.knn``): a distillation
run's student, and its teacher rebuilt from the run's config (or ``--teacher``). Exit 2
with one line for anything the user can fix; 130 when interrupted (Ctrl-C).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pipelines

from .. import distributed
from ..files import atomic_write, make_folder, missing_folders, remove_empty_folders
from ..config import DataConfig
from ..constants import TRUST_SWITCH
from ..errors import OutputNotWritable
from ..logging import log
from ..interop.sources import SourceError, Subject, load_subjects
from ..tasks.evaluation import count_hits, summarize_counts
from ..tasks.knn import FEATURES, KNNSettings, build_knn_loaders, has_cls_token, knn_evaluate
from .common import exit_code, int_at_least
from .teacher_options import add_teacher_options, teacher_spec

PROG = "fdfast-eval"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="fdfast run / checkpoint / best folder, timm export folder, official file")
    p.add_argument("--data", required=True, help="validation set: ImageFolder root (or a .beton with --backend ffcv)")
    p.add_argument("--backend", default="torchvision", choices=("torchvision", "dali", "nvjpeg", "ffcv"))
    p.add_argument("--batch-size", type=int_at_least(1), default=100,
                   help="images per process and batch (default 100)")
    p.add_argument("--workers", type=int_at_least(0), default=min(8, pipelines.usable_cores()),
                   help="decoding workers per process, 0 = in the main process (default: 8, or the usable CPU "
                   "cores if fewer)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument(TRUST_SWITCH, dest="trust_pickle", action="store_true",
                   help="allow model files that pickle code (runs it: only files you trust)")
    k = p.add_argument_group("k-NN: DINO's weighted k-NN accuracy of each model's features (any model: "
                             "distilled students, their teachers, backbones, classifiers)")
    k.add_argument("--knn", action="store_true", help="classify --data by its nearest --knn-train images in feature "
                   "space instead of by a classifier head")
    k.add_argument("--knn-train", help="labelled images searched: ImageFolder root (or a .beton with --backend ffcv)")
    k.add_argument("--knn-k", type=int_at_least(1), default=20, help="neighbours that vote (default 20)")
    k.add_argument("--knn-temperature", type=float, default=0.07, help="vote weight exp(similarity / T) "
                   "(default 0.07)")
    k.add_argument("--knn-feature", choices=FEATURES, default="cls", help="final-norm CLS token, or the mean of the "
                   "patch tokens (default cls)")
    k.add_argument("--knn-per-class", type=int_at_least(0), default=0, help="at most this many --knn-train images "
                   "per class (default 0: all)")
    add_teacher_options(p)
    args = p.parse_args(argv)
    if args.knn and not args.knn_train:
        p.error("--knn needs --knn-train DIR: the labelled images whose features are searched")
    if not (math.isfinite(args.knn_temperature) and args.knn_temperature > 0):
        p.error(f"--knn-temperature must be > 0, got {args.knn_temperature}")
    if not args.knn and (args.knn_train or args.teacher or args.no_teacher):
        p.error("--knn-train, --teacher and --no-teacher apply to --knn (a teacher has no classifier head)")
    return args


def knn(model: Subject, args: argparse.Namespace, info: distributed.DistInfo) -> dict:
    """The k-NN monitor's numbers (``fdfast.tasks.knn``) for ``model``: a distillation run's student gives what
    its ``train.knn_every`` monitor logged, given the same settings."""
    if args.knn_feature == "cls" and not has_cls_token(model.network):
        raise SourceError(f"{model.name} ({model.source}) has no CLS token: use --knn-feature mean")
    # eval_resize None (official FD files) = the official int(256 / 224 * img_size), as in evaluate()
    data = DataConfig(backend=args.backend, train=args.data, val=args.data, knn_train=args.knn_train,
                      knn_train_per_class=args.knn_per_class, eval_resize=model.eval_resize,
                      num_workers=args.workers)
    loaders = build_knn_loaders(data, batch_size=args.batch_size, img_size=model.img_size, device=info.device,
                                rank=info.rank, world_size=info.world_size, names=("--knn-train", "--data"))
    settings = KNNSettings(k=args.knn_k, temperature=args.knn_temperature, feature=args.knn_feature)
    res = knn_evaluate(model.network.to(info.device), *loaders, mean=model.mean, std=model.std, device=info.device,
                       settings=settings)
    return {"model": model.name, "source": model.source, **res, "knn_k": settings.k,
            "knn_temperature": settings.temperature, "knn_feature": settings.feature}


def evaluate(model: Subject, args: argparse.Namespace, info: distributed.DistInfo) -> dict:
    if model.num_classes <= 0:
        raise SourceError(f"{model.source} has no classifier head ({model.role}); evaluate a fine-tuned model, or "
                          "the features of any model with --knn --knn-train DIR")
    # eval only: the validation set stands in for data.train, which the section requires for real backends;
    # eval_resize None (official FD files) = the official int(256 / 224 * img_size)
    data = DataConfig(backend=args.backend, train=args.data, val=args.data, eval_resize=model.eval_resize,
                      num_workers=args.workers, num_classes=model.num_classes)
    loader = pipelines.build_loader(data, train=False, batch_size=args.batch_size, img_size=model.img_size,
                                    device=info.device, rank=info.rank, world_size=info.world_size)
    classes = getattr(loader, "classes", None)
    if classes is not None and len(classes) > model.num_classes:
        raise SourceError(f"--data {args.data} has {len(classes)} classes but {model.name} predicts "
                          f"{model.num_classes}")
    if classes is not None and len(classes) < model.num_classes and info.is_main:
        log(f"warning: --data {args.data} has {len(classes)} classes and {model.name} predicts "
            f"{model.num_classes}: label i is the i-th class folder in sorted order, so the scores only mean "
            "something if those folders are the first classes of the training set")
    network = model.network.to(info.device).eval()
    sums = distributed.all_reduce_sum(count_hits(network, loader, model.mean, model.std, info.device))
    return {"model": model.name, "source": model.source, **summarize_counts(sums).as_dict()}


def _write_json(path: Path, results: list[dict]) -> None:
    try:
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(results, indent=2) + "\n"))
    except OSError as e:  # a folder of that name, a full disk: the results are printed above
        raise OutputNotWritable(f"--json {path}: cannot write it ({e.strerror or e}); the results are "
                                "printed above") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    info = distributed.init_distributed()

    def work() -> int:
        created = missing_folders(Path(args.json).parent) if args.json else []
        try:
            if args.json:
                make_folder(Path(args.json).parent)  # before the evaluation, not after it
            models = load_subjects(args.models, teacher_spec(args), with_teacher=args.knn and not args.no_teacher,
                                   trust_pickle=args.trust_pickle)
            results = [knn(m, args, info) if args.knn else evaluate(m, args, info) for m in models]
        except BaseException:
            remove_empty_folders(created)  # refused: no empty output folder left behind
            raise
        if info.is_main:
            for r in results:
                if args.knn:
                    print(f"{r['model']}: k-NN top-1 {r['knn_top1']:.3f}%  top-5 {r['knn_top5']:.3f}%  "
                          f"({r['knn_count']} images, {r['knn_bank']} searched; k={r['knn_k']} "
                          f"T={r['knn_temperature']:g} {r['knn_feature']}; {r['source']})")
                    continue
                print(f"{r['model']}: top-1 {r['top1']:.3f}%  top-5 {r['top5']:.3f}%  loss {r['loss']:.4f}  "
                      f"({r['count']} images; {r['source']})")
            if args.json:
                _write_json(Path(args.json), results)
        return 0
    code = 1
    try:
        code = exit_code(PROG, work, interrupted="no result was written")
        return code
    finally:
        distributed.shutdown(wait=code == 0)  # a rank that failed alone must not wait for the others


if __name__ == "__main__":
    sys.exit(main())
