"""fdfast-train: parse, build, train. Plain or under torchrun (ranks come from the environment).

Exit codes: 0 done; 1 another process of the job died (one line names the lost rank; the last
checkpoint is intact); 2 a user-fixable error (config, file, missing library, a locked output folder, a
config that no longer fits the checkpoint: one line, no traceback); 3 the loss became NaN/Inf (nothing
saved; the last good checkpoint is kept); 4 stopped by SIGTERM / SIGINT / SIGUSR1 after writing a
checkpoint of the current step and ``"status": "preempted"`` in ``summary.json`` (rerun the same command to
resume). torchrun exits 1 whenever a worker exits non-zero, 4 included: ``summary.json`` tells them apart.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from .. import distributed
from ..config import load_config, to_dict
from ..config.load import list_configs, packaged_configs_dir
from ..constants import TRUST_SWITCH
from ..errors import UserError
from ..guard import EXIT_PREEMPTED
from ..trainer import NonFiniteLoss, Preempted, train


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fdfast-train",
        description="Feature Distillation / fine-tuning / linear probe. Resumes automatically from the "
                    "latest valid checkpoint in train.output_dir.")
    p.add_argument("--config", "-c", help="a YAML file, or the name of a shipped config (see --list-configs)")
    p.add_argument("--list-configs", action="store_true", help="list the shipped configs' names and exit")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, repeatable: --set optim.base_lr=1e-3 --set train.epochs=10")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even when the config changes the model, data geometry, augmentation or optimizer "
                        "the checkpoint was trained with (the changes are logged)")
    p.add_argument(TRUST_SWITCH, dest="trust_pickle", action="store_true",
                   help="allow teacher / pretrained files that pickle code (runs it: only files you trust); "
                        "only this switch grants it, never a config")
    args = p.parse_args(argv)
    if not (args.config or args.list_configs):
        p.error("--config is required: a YAML file or a shipped config name (see --list-configs)")
    return args


def print_config_list() -> None:
    configs = list_configs()
    print(f"configs shipped with fdfast ({packaged_configs_dir()}); run one with --config NAME:")
    width = max(len(name) for name, _ in configs)
    for name, about in configs:
        print(f"  {name:<{width}}  {about}")


def _loss_trend(output_dir: str) -> str:
    """'loss A (step a) -> B (step b)' over the whole run, resumed parts included."""
    path = Path(output_dir) / "metrics.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines()
            if '"loss"' in x and '"eval"' not in x] if path.exists() else []
    if not recs:
        return "no loss logged"
    return f"loss {recs[0]['loss']:.4f} (step {recs[0]['step']}) -> {recs[-1]['loss']:.4f} (step {recs[-1]['step']})"


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.list_configs:
            print_config_list()
            return 0
        cfg = load_config(args.config, args.overrides)
    except UserError as e:
        print(f"fdfast-train: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    info = distributed.init_distributed()
    together = False  # every rank ends this way at the same step: they can meet at a barrier before leaving
    try:
        summary = train(cfg, info, allow_config_change=args.allow_config_change, trust_pickle=args.trust_pickle)
        together = True
    except NonFiniteLoss as e:
        together = True
        print(f"fdfast-train: {e}", file=sys.stderr)
        return 3
    except Preempted as e:
        together = True
        print(f"fdfast-train: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    except distributed.LostRank as e:
        print(f"fdfast-train: {e}", file=sys.stderr)
        return 1
    except UserError as e:  # bad input: one clear line, no traceback
        print(f"fdfast-train: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown(wait=together)
    if info.is_main:
        best = summary.get("best") or {}
        top1 = f", best top-1 {best['top1']:.2f}% (epoch {best['epoch']})" if "top1" in best else ""
        print(f"[fdfast] done: step {summary['step']}, {_loss_trend(summary['output_dir'])}{top1}, "
              f"{summary['seconds']:.0f}s this run, outputs in {summary['output_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
