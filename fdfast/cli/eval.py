"""fdfast-eval: top-1 / top-5 of classifiers on a validation set, exactly counted (under torchrun too).

    fdfast-eval runs/ft_clip_vit_base_300ep --data /data/imagenet/val
    fdfast-eval runs/ft/best exported/ft_clip_b16/ ft_official.pth --data /data/imagenet/val --json val.json

A model is an fdfast fine-tune run folder, checkpoint or ``best/`` folder (evaluated with the run's own
``data.eval_resize`` and ``train.eval_norm``), a timm export folder (its ``pretrained_cfg``), or an
official FD fine-tuned checkpoint (architecture read from the tensors, ImageNet normalisation). Exit 2
with one line for anything the user can fix; 130 when interrupted (Ctrl-C).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pipelines

from .. import distributed
from ..checkpoint import atomic_write, make_folder
from ..config import DataConfig
from ..errors import OutputNotWritable
from ..logging import log
from ..interop.sources import SourceError, Subject, load_subjects
from ..tasks.evaluation import count_hits, summarize_counts
from .common import exit_code, int_at_least

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
    p.add_argument("--trust-pickle", action="store_true", help="allow files that pickle code (runs it)")
    return p.parse_args(argv)


def evaluate(model: Subject, args: argparse.Namespace, info: distributed.DistInfo) -> dict:
    if model.num_classes <= 0:
        raise SourceError(f"{model.source} has no classifier head ({model.role}); evaluate a fine-tuned model, or "
                          "use fdfast-analyze for a distilled student")
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
        if args.json:
            make_folder(Path(args.json).parent)  # before the evaluation, not after it
        models = load_subjects(args.models, with_teacher=False, trust_pickle=args.trust_pickle)
        results = [evaluate(m, args, info) for m in models]
        if info.is_main:
            for r in results:
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
