"""Tiny random timm teachers written in the file layouts people download them in.

Each writer takes the source model (timm keys) and writes its weights the way the publisher does, with the
publisher's own key names (rewritten here by hand, not by timm's converters): a timm folder (``save_for_hf``,
what the ``timm/<name>`` hub repositories hold), a Hugging Face hub-cache repository (``refs/main`` ->
``snapshots/<commit>/`` symlinks into ``blobs/``), single files, and the original releases: DINOv2
(``mask_token``, ``register_tokens``, the class token's position inside ``pos_embed``), DINOv3
(``storage_tokens``, ``ls1.gamma``, zero ``qkv.bias`` + ``bias_mask``, ``rope_embed.periods``), OpenAI/OpenCLIP
(``visual.conv1`` ... ``visual.proj`` beside a text tower) and OpenCLIP timm trunks (``visual.trunk.*`` beside a
text tower and the projection head).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.models._hub import save_for_hf

from test_teachers import _randomize as randomize  # non-trivial values everywhere: layer scales of 1e-5 hide blocks

TINY = dict(embed_dim=32, depth=2, num_heads=2)
COMMIT = "0123456789abcdef0123456789abcdef01234567"

# name -> (timm model, patch size) of the tiny sources; grid 4x4 at img = 4 * patch
SOURCES = {
    "dinov2_reg4": ("vit_base_patch14_reg4_dinov2", 7),
    "dinov2": ("vit_base_patch14_dinov2", 7),
    "dinov3": ("vit_base_patch16_dinov3", 8),
    "siglip": ("vit_base_patch16_siglip_224", 8),
    "eva02_clip": ("eva02_base_patch16_clip_224", 8),
    "clip_l14": ("vit_large_patch14_clip_224", 7),
    "pe_core": ("vit_pe_core_base_patch16_224", 8),
}


def tiny_source(key: str, seed: int = 0, grid: int = 4) -> tuple[str, nn.Module, int]:
    """(timm name, randomized headless tiny model, its img_size)."""
    name, patch = SOURCES[key]
    img = grid * patch
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=img, patch_size=patch, **TINY).eval()
    randomize(model, seed)
    return name, model, img


# ----------------------------------------------------------------------------------------------
# timm folders, hub caches, single files
# ----------------------------------------------------------------------------------------------
def timm_folder(model: nn.Module, folder: Path, safetensors: bool = True) -> Path:
    save_for_hf(model, str(folder), safe_serialization=safetensors)
    return folder


def hub_cache(model: nn.Module, root: Path, repo: str) -> Path:
    """``root/models--timm--<repo>`` as huggingface_hub lays it out; returns the repository folder."""
    repo_dir = root / f"models--timm--{repo}"
    staging = root / "staging"
    timm_folder(model, staging)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    snapshot, blobs = repo_dir / "snapshots" / COMMIT, repo_dir / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in staging.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.move(str(f), blobs / digest)
        os.symlink(os.path.join("..", "..", "blobs", digest), snapshot / f.name)
    staging.rmdir()
    return repo_dir


def single_file(sd: dict, path: Path) -> Path:
    sd = {k: v.contiguous() for k, v in sd.items()}
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


# ----------------------------------------------------------------------------------------------
# Original release key layouts
# ----------------------------------------------------------------------------------------------
def dinov2_original(model: nn.Module) -> dict:
    """facebookresearch/dinov2 ``DinoVisionTransformer.state_dict()``: the class token's position sits in
    ``pos_embed`` (timm's register models fold it into ``cls_token``), registers are ``register_tokens``."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    dim = sd["norm.weight"].shape[0]
    out = {"mask_token": torch.zeros(1, dim)}
    if "reg_token" in sd:
        pos_cls = 0.1 * torch.randn(1, 1, dim, generator=torch.Generator().manual_seed(7))
        out["register_tokens"] = sd.pop("reg_token")
        out["cls_token"] = sd.pop("cls_token") - pos_cls
        out["pos_embed"] = torch.cat([pos_cls, sd.pop("pos_embed")], dim=1)
    out.update(sd)  # blocks.i.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}, norm
    return out


def dinov3_original(model: nn.Module, qkv_bias: float = 0.0) -> dict:
    """facebookresearch/dinov3 ``DinoVisionTransformer.state_dict()`` of a ViT-B-like model."""
    out = {}
    dim = model.cls_token.shape[-1]
    for k, v in model.state_dict().items():
        k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        out[k] = v.clone()
        if k.endswith("attn.qkv.weight"):
            out[k.replace("weight", "bias")] = torch.full((3 * dim,), qkv_bias)
            mask = torch.ones(3 * dim)
            mask[dim:2 * dim] = 0  # LinearKMaskedBias: no key bias
            out[k.replace("weight", "bias_mask")] = mask
    out["mask_token"] = torch.zeros(1, dim)
    out["rope_embed.periods"] = torch.arange(1, dim // 2 // 4 + 1, dtype=torch.float32)
    return out


def _text_tower(seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"token_embedding.weight": torch.randn(40, 16, generator=g),
            "positional_embedding": torch.randn(8, 16, generator=g),
            "transformer.resblocks.0.attn.in_proj_weight": torch.randn(48, 16, generator=g),
            "transformer.resblocks.0.ln_1.weight": torch.ones(16), "ln_final.weight": torch.ones(16),
            "text_projection": torch.randn(16, 12, generator=g), "logit_scale": torch.tensor(4.6)}


def openai_clip_original(model: nn.Module) -> dict:
    """OpenAI / OpenCLIP ``open_clip_pytorch_model.bin`` of a ViT (``visual.*`` in OpenAI's names + a text
    tower), from a timm ``*_clip_*`` model."""
    sd = model.state_dict()
    out = {"visual.class_embedding": sd["cls_token"][0, 0].clone(),
           "visual.positional_embedding": sd["pos_embed"][0].clone(),
           "visual.conv1.weight": sd["patch_embed.proj.weight"].clone(),
           "visual.proj": 0.1 * torch.randn(sd["norm.weight"].shape[0], 12)}
    names = {"norm_pre": "ln_pre", "norm": "ln_post", "norm1": "ln_1", "norm2": "ln_2", "attn.qkv.weight":
             "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias", "attn.proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for k, v in sd.items():
        if k in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
            continue
        head, _, rest = k.partition(".")
        if head == "blocks":
            index, _, rest = rest.partition(".")
            param = rest.rsplit(".", 1)
            rest = names.get(rest, f"{names.get(param[0], param[0])}.{param[1]}")
            out[f"visual.transformer.resblocks.{index}.{rest}"] = v.clone()
        else:
            out[f"visual.{names[head]}.{rest}"] = v.clone()
    return {**out, **_text_tower()}


def open_clip_trunk(model: nn.Module, head: str = "visual.head.proj.weight") -> dict:
    """OpenCLIP with a timm image tower (SigLIP, EVA-02): ``visual.trunk.<timm keys>``, a projection head
    outside the trunk, and the text tower."""
    out = {f"visual.trunk.{k}": v.clone() for k, v in model.state_dict().items()}
    out[head] = 0.1 * torch.randn(12, model.num_features)
    return {**out, **_text_tower()}


def openclip_folder(sd: dict, folder: Path, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                    safetensors: bool = True) -> Path:
    """An OpenCLIP hub folder: open_clip_config.json (its preprocess_cfg) + the whole model's weights."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": {"embed_dim": 12}, "preprocess_cfg": {"mean": list(mean), "std": list(std)}}))
    single_file(sd, folder / ("open_clip_model.safetensors" if safetensors else "open_clip_pytorch_model.bin"))
    return folder
