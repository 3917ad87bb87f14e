"""fdfast-export: turn an fdfast training checkpoint into timm weights or the official FD layout.

    fdfast-export runs/fd/checkpoints/step_00062500 --format timm --out exported/fd_vitb
    fdfast-export runs/fd --format official --out exported/fd_vitb.pth
    fdfast-export runs/ft --format timm --out exported/ft_vitb          # a fine-tune run: its best/ weights

The checkpoint's own config names the student architecture and the eval preprocessing. ``--format timm``
writes a folder in the timm / Hugging Face layout (``model.safetensors`` + ``config.json``; or a
``.safetensors`` file with ``config.json`` beside it) that ``timm.create_model('local-dir:<folder>',
pretrained=True)`` loads exactly; distilled and fine-tuned students both work. ``--format official`` writes
``{'model': {'encoder.*', 'decoder.*'}}`` for the official fine-tuning code (distilled students only; a student
of several teachers: ``encoder.*`` only, the layout's one decoder being the projector onto one teacher).
``--with-heads`` also writes the projector heads, by teacher name, to ``<backbone stem>.heads.safetensors``.
Exit codes: 0 written; 2 a file or option the user can fix (one line, no traceback); 130 interrupted.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from ..constants import TRUST_SWITCH
from ..errors import UserError
from ..interop.export import export_checkpoint, export_source
from ..interop.heads_export import heads_path
from .common import exit_code

PROG = "fdfast-export"
INPUTS = """\
checkpoint is one of (fdfast-train's outputs):
  RUN                     a run folder (train.output_dir): its best/ weights when it
                          has them (fine-tune / probe runs with data.val), else its
                          newest complete checkpoint; --which best|last chooses
  RUN/checkpoints         the same as RUN
  RUN/checkpoints/step_N  that checkpoint (a step_XXXXXXXX folder)
  RUN/best                the best weights of a fine-tune / probe run
  .../state.pt            the weights file inside any of those folders"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=INPUTS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="run folder, step folder, best/ or state.pt (see below)")
    p.add_argument("--which", choices=("best", "last"), default=None,
                   help="with a run folder: its best/ weights or its newest checkpoint (default: best when the run "
                        "has it, else last)")
    p.add_argument("--format", required=True, choices=("timm", "official"), help="output layout")
    p.add_argument("--out", required=True, help="timm: output folder (or .safetensors file); official: .pth file")
    p.add_argument("--model-name", default=None,
                   help="timm: registered architecture recorded in config.json (default: same family, e.g. "
                        "beit_base_patch16_224); the exact arguments are recorded as model_args either way")
    p.add_argument("--finetune-layout", action="store_true",
                   help="timm, distilled ViT: write the fine-tune layout (one relative position bias table per "
                        "block, mean pooling + fresh fc_norm, final norm dropped) so a stock timm BEiT loads it")
    p.add_argument("--with-heads", action="store_true",
                   help="distilled students: also write the projector heads, by teacher name (a run with several "
                        "teachers has one per teacher), to <backbone stem>.heads.safetensors beside the backbone")
    p.add_argument(TRUST_SWITCH, dest="trust_pickle", action="store_true",
                   help="taken by every command that reads files; changes nothing here: fdfast checkpoints hold "
                        "only tensors and plain values, and one that pickles code is refused whatever the switch")
    p.add_argument("-q", "--quiet", action="store_true", help="only print errors")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")

    def work() -> int:
        out = export_checkpoint(export_source(args.checkpoint, args.which), args.format, args.out,
                                model_name=args.model_name, finetune_layout=args.finetune_layout,
                                with_heads=args.with_heads)
        print(out)  # stdout: just the written path(s), for scripts; the details went to the log (stderr)
        if args.with_heads:
            print(heads_path(out))
        return 0
    # OSError: --out cannot be written (permissions, space)
    return exit_code(PROG, work, errors=(UserError, OSError), label="error",
                     interrupted="nothing was written (files are only renamed into place when complete)")


if __name__ == "__main__":
    sys.exit(main())
