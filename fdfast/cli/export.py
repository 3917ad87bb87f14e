"""fdfast-export: turn an fdfast training checkpoint into timm weights or the official FD layout.

    fdfast-export runs/fd/checkpoints/step_00062500 --format timm --out exported/fd_vitb
    fdfast-export runs/fd --format official --out exported/fd_vitb.pth

The checkpoint's own config names the student architecture. ``--format timm`` writes a folder in the
timm / Hugging Face layout (``model.safetensors`` + ``config.json``; or a ``.safetensors`` file with
``config.json`` beside it) that ``timm.create_model('local-dir:<folder>', pretrained=True)`` loads;
distilled and fine-tuned students both work. ``--format official`` writes ``{'model': {'encoder.*',
'decoder.*'}}`` for the official fine-tuning code (distilled students only).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch.nn as nn

from .. import interop

PROG = "fdfast-export"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="fdfast checkpoint: step_XXXXXXXX folder, its state.pt, or the run folder "
                                      "(newest complete checkpoint)")
    p.add_argument("--format", required=True, choices=("timm", "official"), help="output layout")
    p.add_argument("--out", required=True, help="timm: output folder (or .safetensors file); official: .pth file")
    p.add_argument("--model-name", default=None,
                   help="timm: registered architecture recorded in config.json (default: same family, e.g. "
                        "beit_base_patch16_224); the exact sizes are recorded as model_args either way")
    p.add_argument("--finetune-layout", action="store_true",
                   help="timm, distilled ViT: write the fine-tune layout (one relative position bias table per "
                        "block, mean pooling + fresh fc_norm, final norm dropped) so a stock timm BEiT loads it")
    p.add_argument("-q", "--quiet", action="store_true", help="only print errors")
    return p


def _head_classes(student_sd: dict, arch: str) -> int:
    key = "head.weight" if arch == "beit" else "head.fc.weight"
    w = student_sd.get(key)
    return int(w.shape[0]) if w is not None else 0


def run(args: argparse.Namespace) -> Path:
    ckpt = interop.read_fdfast_checkpoint(args.checkpoint)
    try:
        fields = dict(ckpt.config["model"]["student"])
    except (KeyError, TypeError):
        raise interop.CheckpointReadError(f"{ckpt.path}: config has no model.student section") from None
    arch = fields.get("arch")
    num_classes = _head_classes(ckpt.student, arch)
    # a fine-tuned ViT has per-block tables and a head; a distilled one the shared table
    finetuned = num_classes > 0 or (arch == "beit" and "rel_pos_bias.relative_position_bias_table" not in ckpt.student
                                    and "blocks.0.attn.relative_position_bias_table" in ckpt.student)
    _, model_args = interop.timm_student_kwargs(fields, num_classes=num_classes, finetune=finetuned)
    student = interop.build_timm_student_from_fields(fields, num_classes=num_classes, finetune=finetuned)
    # exact load: the checkpoint was written from this very architecture
    interop.load_converted_state_dict(student, ckpt.student, source=str(ckpt.path), layout=interop.LAYOUT_FDFAST,
                                      arch=arch, expected_missing=())

    if args.format == "official":
        if finetuned:
            raise ValueError(f"{ckpt.path} holds a fine-tuned student (head with {num_classes} classes); the "
                             "official layout is for distilled students. Use --format timm")
        if ckpt.projector is None:
            logging.getLogger(PROG).warning("checkpoint has no projector; writing encoder.* only "
                                            "(enough for the official fine-tuning loader)")
        projector = None
        if ckpt.projector is not None:
            w = ckpt.projector["weight"]
            projector = nn.Linear(w.shape[1], w.shape[0])
            projector.load_state_dict(ckpt.projector)
        out = Path(args.out)
        if out.is_dir():
            out = out / "checkpoint.pth"
        return interop.export_official(student, projector, out, arch,
                                       extra={"fdfast": {"source": str(ckpt.path), "step": ckpt.step,
                                                         "student": json.loads(json.dumps(fields))}})

    if args.finetune_layout and arch == "beit" and not finetuned:
        _, model_args = interop.timm_student_kwargs(fields, num_classes=0, finetune=True)
        ft = interop.build_timm_student_from_fields(fields, num_classes=0, finetune=True)
        interop.load_converted_state_dict(ft, student.state_dict(), source=str(ckpt.path),
                                          layout=interop.LAYOUT_FDFAST, arch=arch, expected_missing=("fc_norm.",))
        student = ft
    elif args.finetune_layout:
        logging.getLogger(PROG).info("--finetune-layout: nothing to change for a %s student",
                                     "fine-tuned" if finetuned else arch)
    name = args.model_name or interop.default_timm_model_name(arch, model_args)
    return interop.export_timm(student, args.out, name, model_args=model_args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        out = run(args)
    except (ValueError, OSError) as e:  # CheckpointReadError / CheckpointKeyError are ValueErrors
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    print(out)  # stdout: just the written path, for scripts; the details went to the log (stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
