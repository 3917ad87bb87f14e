"""fdfast-train: parse, build, train. Plain or under torchrun (ranks come from the environment)."""
from __future__ import annotations

import argparse
import sys

from ..config import ConfigError, load_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fdfast-train",
        description="Feature Distillation / fine-tuning / linear probe. Resumes automatically from the "
                    "latest valid checkpoint in train.output_dir.")
    p.add_argument("--config", "-c", required=True, help="YAML config (see configs/)")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, repeatable: --set optim.base_lr=1e-3 --set train.epochs=10")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p.parse_args(argv)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's input (config, files, missing optional libraries)."""
    from pipelines.base import MissingDependency  # noqa: PLC0415

    from ..models.interop import CheckpointKeyError, CheckpointReadError  # noqa: PLC0415
    from ..models.teachers import TeacherLoadError  # noqa: PLC0415

    return (ConfigError, FileNotFoundError, TeacherLoadError, CheckpointKeyError, CheckpointReadError,
            MissingDependency)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"fdfast-train: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml  # noqa: PLC0415

        from ..config import to_dict  # noqa: PLC0415
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from .. import distributed  # noqa: PLC0415
    from ..trainer import NonFiniteLoss, train  # noqa: PLC0415

    info = distributed.init_distributed()
    try:
        summary = train(cfg, info)
    except NonFiniteLoss as e:
        print(f"fdfast-train: {e}", file=sys.stderr)
        return 3
    except _user_errors() as e:  # bad input: one clear line, no traceback
        print(f"fdfast-train: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    if info.is_main:
        best = summary.get("best") or {}
        top1 = f", best top-1 {best['top1']:.2f}% (epoch {best['epoch']})" if "top1" in best else ""
        print(f"[fdfast] done: step {summary['step']}, {_loss_trend(summary['output_dir'])}{top1}, "
              f"{summary['seconds']:.0f}s this run, outputs in {summary['output_dir']}")
    return 0


def _loss_trend(output_dir: str) -> str:
    """'loss A (step a) -> B (step b)' over the whole run, resumed parts included."""
    import json  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    recs = [json.loads(x) for x in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in x and '"eval"' not in x] if (Path(output_dir) / "metrics.jsonl").exists() else []
    if not recs:
        return "no loss logged"
    return f"loss {recs[0]['loss']:.4f} (step {recs[0]['step']}) -> {recs[-1]['loss']:.4f} (step {recs[-1]['step']})"


if __name__ == "__main__":
    sys.exit(main())
