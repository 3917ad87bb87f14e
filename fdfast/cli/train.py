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
    except ConfigError as e:
        print(f"fdfast-train: config error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"fdfast-train: {e}", file=sys.stderr)
        return 3
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        if type(e).__name__ in ("TeacherLoadError", "CheckpointKeyError", "MissingDependency") or isinstance(
                e, FileNotFoundError):
            print(f"fdfast-train: {e}", file=sys.stderr)
            return 2
        raise
    finally:
        distributed.shutdown()
    if info.is_main:
        print(f"[fdfast] done: step {summary['step']}, loss {summary['loss']:.4f}, "
              f"{summary['seconds']:.0f}s, outputs in {summary['output_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
