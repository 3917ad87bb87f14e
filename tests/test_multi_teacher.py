"""Several teachers at once (model.teachers): the loss and every gradient against an independent plain-torch
reference, the per-teacher losses in the step and the logs, PHI-S estimated from exactly the first batches and
never re-estimated after a resume, the config rules, the export of the heads, and the shipped two-teacher config
through fdfast-train."""
from __future__ import annotations

import json

import pytest
import timm
import yaml
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from _step_helpers import build_run, cuda_only, exact_fp32, max_weight_diff, uint8_batches
from conftest import tiny_dict
from fdfast.cli import export as export_cli
from fdfast.cli import train as train_cli
from fdfast.config import ConfigError, TeacherConfig, config_from_dict, load_config
from fdfast.config.load import to_dict, without_command_line_keys
from fdfast.resume import config_changes
from fdfast.distributed import DistInfo
from fdfast.errors import UserError
from fdfast.interop.heads_export import read_heads
from fdfast.interop.sources import SourceError, load_subjects
from fdfast.step import TrainStep
from fdfast.tasks import DistillTask
from fdfast.trainer import seed_all, train

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# a SigLIP-like teacher (no CLS token: 16 patch tokens) and a DINOv2-like one (CLS + 4 registers + 16 patches,
# patch 7 under the student's patch 8: input resized to 28 px), both at 1/100 of their width
SIGLIP = {"name": "sig", "kind": "timm", "model": "vit_base_patch16_siglip_224", "weights": "random",
          "model_kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}}
DINOV2 = {"name": "dino", "kind": "timm", "model": "vit_base_patch14_reg4_dinov2", "weights": "random",
          "model_kwargs": {"patch_size": 7, "embed_dim": 48, "depth": 1, "num_heads": 2}}


def _cfg(tmp_path, teachers, **sections):
    d = tiny_dict(tmp_path, **sections)
    del d["model"]["teacher"]
    d["model"]["teachers"] = teachers
    d["model"]["student"]["drop_path"] = 0.0  # deterministic student: the reference recomputes its forward
    return config_from_dict(d)


def _images(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)


# ------------------------------------------------------------------------------------------------
# the independent reference: plain torch on the timm modules' own parameters
# ------------------------------------------------------------------------------------------------
def _ref_target(timm_teacher, images, norm, size, keep):
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in norm)
    x = (images.float() / 255 - mean) / std
    if size != images.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    tokens = timm_teacher.forward_features(x)[:, keep]
    return F.layer_norm(tokens, tokens.shape[-1:], eps=1e-5)


def _ref_head(head, tokens):
    if isinstance(head, nn.Linear):
        return F.linear(tokens, head.weight, head.bias)
    h = F.linear(tokens, head.fc1.weight, head.fc1.bias)
    h = F.gelu(F.layer_norm(h, h.shape[-1:], head.norm.weight, head.norm.bias, eps=1e-5))
    return F.linear(h, head.fc2.weight, head.fc2.bias)


def _ref_losses(task, images):
    """{teacher name: SmoothL1(β=2) of its whitened target vs its head on the student tokens}."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in IMAGENET)
    tokens = task.model.encoder.forward_features((images.float() / 255 - mean) / std)  # CLS + 16 patches
    sig, dino = (task.slots[i].teacher.model for i in range(2))
    targets = {"sig": _ref_target(sig, images, HALF, 32, slice(0, 16)),
               "dino": _ref_target(dino, images, IMAGENET, 28, [0, *range(5, 21)])}  # CLS, 4 registers out
    preds = {"sig": _ref_head(task.model.heads["sig"], tokens)[:, 1:],  # no CLS target: student CLS left out
             "dino": _ref_head(task.model.heads["dino"], tokens)}
    return {n: F.smooth_l1_loss(preds[n], targets[n], beta=2.0) for n in targets}


def test_loss_and_every_gradient_are_the_weighted_sum_of_the_single_teacher_ones(tmp_path):
    cfg = _cfg(tmp_path, [{**SIGLIP, "weight": 0.7}, {**DINOV2, "weight": 1.3, "head": "mlp"}])
    seed_all(0)
    task = DistillTask(cfg, DistInfo())
    params = [p for p in task.model.parameters() if p.requires_grad]
    images = _images()
    out = task.loss(images, torch.zeros(4, dtype=torch.int64))
    assert set(out) == {"loss", "loss_sig", "loss_dino"}
    ref = _ref_losses(task, images)
    for name, loss in ref.items():
        torch.testing.assert_close(out[f"loss_{name}"], loss.detach(), rtol=1e-6, atol=0)
    weights = {"sig": 0.7, "dino": 1.3}
    torch.testing.assert_close(out["loss"], sum(w * ref[n] for n, w in weights.items()).detach(), rtol=1e-6, atol=0)
    got = torch.autograd.grad(out["loss"], params, allow_unused=True)
    single = {n: torch.autograd.grad(ref[n], params, allow_unused=True, retain_graph=True) for n in ref}
    names = [n for n, p in task.model.named_parameters() if p.requires_grad]
    for i, (name, g) in enumerate(zip(names, got)):
        want = sum(w * single[n][i] for n, w in weights.items() if single[n][i] is not None)
        # per tensor, relative to its largest entry: the two sums round differently in fp32 (~3e-7 seen)
        assert g is not None and (g - want).abs().max() <= 1e-5 * want.abs().max(), name
    # each head learns from its own teacher only; the student from both
    assert single["sig"][names.index("heads.dino.fc1.weight")] is None
    assert single["dino"][names.index("heads.sig.weight")] is None


def test_train_step_averages_every_loss_part_over_the_micro_batches():
    model = nn.Linear(3, 1, bias=False)
    xs = [torch.ones(2, 3), 3 * torch.ones(2, 3)]
    calls = iter(xs)

    def loss_fn(images, labels):
        y = model(next(calls)).mean()
        return {"loss": 2 * y, "loss_a": y.detach(), "loss_b": (y * y).detach()}
    step = TrainStep(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.0), list(model.parameters()),
                     precision="fp32", device=torch.device("cpu"))
    w = model.weight.detach().clone()
    ys = [float((x @ w.T).mean()) for x in xs]
    out = step([(torch.zeros(1), torch.zeros(1))] * 2)
    assert set(out) == {"loss", "loss_a", "loss_b", "grad_norm", "skipped"}
    assert out["loss"].item() == pytest.approx(sum(2 * y for y in ys) / 2)
    assert out["loss_a"].item() == pytest.approx(sum(ys) / 2)
    assert out["loss_b"].item() == pytest.approx(sum(y * y for y in ys) / 2)
    # the gradient is the total's alone (d/dw mean of 2 * x.w over the two micro-batches = 2 * mean x = 4)
    assert out["grad_norm"].item() == pytest.approx(float(torch.full((3,), 4.0).norm()))


# ------------------------------------------------------------------------------------------------
# PHI-S in the task
# ------------------------------------------------------------------------------------------------
def _phi_s_task(tmp_path):
    cfg = _cfg(tmp_path, [{**SIGLIP, "whiten": "phi_s"}, DINOV2], model={"phi_s_batches": 2})
    seed_all(0)
    return DistillTask(cfg, DistInfo())


def test_phi_s_is_estimated_from_exactly_the_first_batches(tmp_path):
    task = _phi_s_task(tmp_path)
    batches = [(_images(8, seed=i), torch.zeros(8, dtype=torch.int64)) for i in range(3)]
    task.prepare(iter(batches))
    phi = task.slots[0].phi_s
    assert task.slots[1].phi_s is None  # FD's LayerNorm for the other teacher
    assert int(phi.tokens) == 2 * 8 * 16
    # on those two batches the target is centred, with unit variance in every channel (PHI-S: one scalar)
    y = torch.cat([task.slots[0].target(b[0]) for b in batches[:2]]).reshape(-1, 32).double()
    torch.testing.assert_close(y.mean(0), torch.zeros(32, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(0, unbiased=False), torch.ones(32, dtype=torch.float64), atol=1e-4, rtol=0)
    w = phi.transform.double()
    torch.testing.assert_close(w @ w.T * phi.scale.double() ** 2, torch.eye(32, dtype=torch.float64), atol=1e-5,
                               rtol=0)  # a rotation and one scale, not a per-axis whitening
    # the statistics of the teacher tokens the test computes itself, from the first two batches only
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in HALF)
    x = torch.cat([task.slots[0].teacher.model.forward_features((b[0].float() / 255 - mean) / std)
                   for b in batches[:2]]).reshape(-1, 32).double()
    torch.testing.assert_close(phi.mean.double(), x.mean(0), atol=1e-5, rtol=0)
    cov = torch.cov(x.T, correction=0)
    torch.testing.assert_close((w @ cov @ w.T).diagonal(), torch.ones(32, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(phi.scale.double() ** 2, cov.trace() / 32, rtol=1e-5, atol=0)
    y3 = task.slots[0].target(batches[2][0]).reshape(-1, 32)
    assert y3.mean(0).abs().max() > 1e-3  # the third batch was not part of the estimate


def test_a_resumed_task_keeps_its_phi_s_and_reads_no_batch(tmp_path):
    task = _phi_s_task(tmp_path)
    task.prepare([(_images(8, seed=i), None) for i in range(2)])
    state = task.state_dict()
    assert set(state["phi_s"]) == {"sig"}
    resumed = _phi_s_task(tmp_path)
    resumed.load_state_dict(state)

    def no_batches():
        raise AssertionError("a resumed run must not re-estimate")
        yield
    resumed.prepare(no_batches())
    for k, v in state["phi_s"]["sig"].items():
        assert torch.equal(getattr(resumed.slots[0].phi_s, k), v), k
    images = _images(4, seed=9)
    assert torch.equal(resumed.slots[0].target(images), task.slots[0].target(images))


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------
def test_teacher_and_teachers_together_is_one_line(tmp_path):
    d = tiny_dict(tmp_path)
    d["model"]["teachers"] = [SIGLIP]
    with pytest.raises(ConfigError) as e:
        config_from_dict(d)
    assert "model.teacher and model.teachers are both set" in str(e.value) and "\n" not in str(e.value)
    d["model"]["teachers"] = [SIGLIP, {**DINOV2, "name": "sig"}]
    del d["model"]["teacher"]
    with pytest.raises(ConfigError, match="'sig' is used more than once"):
        config_from_dict(d)
    d["model"]["teachers"] = [{**SIGLIP, "name": "sig.1"}]
    with pytest.raises(ConfigError, match="must start with a letter"):
        config_from_dict(d)


def test_overrides_address_a_teacher_by_name_or_index():
    cfg = load_config("fd_siglip2_dinov2_vit_base", ["model.teachers.dinov2.weights=/w/d.pth",
                                                     "model.teachers.0.head=linear"])
    assert [t.weights for t in cfg.model.teachers][1] == "/w/d.pth"
    assert [t.head for t in cfg.model.teachers] == ["linear", "mlp"]
    with pytest.raises(ConfigError, match="'dino' names no entry of the list .*siglip2, dinov2"):
        load_config("fd_siglip2_dinov2_vit_base", ["model.teachers.dino.weights=x"])


def test_a_teacher_that_cannot_be_built_is_named(tmp_path):
    cfg = _cfg(tmp_path, [SIGLIP, {**DINOV2, "weights": str(tmp_path / "missing.pth")}])
    with pytest.raises(UserError) as e:
        DistillTask(cfg, DistInfo())
    assert str(e.value).startswith("model.teachers.dino: ") and "missing.pth" in str(e.value)


# ------------------------------------------------------------------------------------------------
# the shipped config through fdfast-train, then fdfast-export
# ------------------------------------------------------------------------------------------------
TINY_RUN = ["data.num_workers=0", "train.max_steps=2", "compile.enabled=false", "log.progress=none", "log.every=1",
            "checkpoint.every=2", "model.student.img_size=32", "model.student.patch_size=8",
            "model.student.embed_dim=32", "model.student.depth=2", "model.student.num_heads=2",
            "data.backend=synthetic", "data.synthetic_size=8", "train.batch_size=4",
            "model.phi_s_batches=2", "model.teachers.siglip2.weights=random",
            "model.teachers.siglip2.model_kwargs={patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}",
            "model.teachers.dinov2.weights=random",
            "model.teachers.dinov2.model_kwargs={patch_size: 7, embed_dim: 48, depth: 1, num_heads: 2}"]


@pytest.fixture(scope="module")
def shipped_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("multi") / "run"
    sets = [a for o in [*TINY_RUN, f"train.output_dir={out}"] for a in ("--set", o)]
    assert train_cli.main(["--config", "fd_siglip2_dinov2_vit_base", *sets]) == 0
    return out


def test_fdfast_train_with_the_shipped_two_teacher_config_logs_each_teachers_loss(shipped_run):
    records = [json.loads(x) for x in (shipped_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert 0 < r["loss_siglip2"] < 10 and 0 < r["loss_dinov2"] < 10
        assert r["loss"] == pytest.approx(r["loss_siglip2"] + r["loss_dinov2"], rel=1e-5)  # weights 1.0 and 1.0
    tb = EventAccumulator(str(shipped_run / "tensorboard"))
    tb.Reload()
    assert {"train/loss", "train/loss_siglip2", "train/loss_dinov2"} <= set(tb.Tags()["scalars"])
    state = torch.load(next((shipped_run / "checkpoints").glob("step_*")) / "state.pt", weights_only=True)
    assert {k.split(".")[1] for k in state["model"] if k.startswith("heads.")} == {"siglip2", "dinov2"}
    assert set(state["extra"]["phi_s"]) == {"siglip2", "dinov2"}  # both shipped teachers use PHI-S
    # the run's records name every teacher's weights (random here: no file, no hash)
    assert json.loads((shipped_run / "summary.json").read_text())["teacher_sha256"] == {"siglip2": None,
                                                                                        "dinov2": None}


def test_the_records_of_several_teachers_hold_no_unused_model_teacher(shipped_run):
    """config.yaml and the checkpoint's config name the run's teachers only: model.teacher at its defaults
    would read as a CLIP B/16 teacher that the run never used."""
    saved = yaml.safe_load((shipped_run / "config.yaml").read_text())
    assert "teacher" not in saved["model"] and [t["name"] for t in saved["model"]["teachers"]] == ["siglip2", "dinov2"]
    state = torch.load(next((shipped_run / "checkpoints").glob("step_*")) / "state.pt", weights_only=True)
    assert "teacher" not in state["config"]["model"]
    cfg = load_config(shipped_run / "config.yaml")  # read back: the unused section is its default again
    assert cfg.model.teacher == TeacherConfig() and [t.name for t in cfg.model.teachers] == ["siglip2", "dinov2"]
    # a checkpoint of an earlier version, which wrote the unused section, is not a config change on resume
    earlier = {**state["config"], "model": {**state["config"]["model"], "teacher": to_dict(TeacherConfig())}}
    assert config_changes(without_command_line_keys(earlier), to_dict(cfg)) == []


def test_export_writes_the_backbone_and_each_teachers_head(shipped_run, tmp_path, capsys, caplog):
    assert export_cli.main([str(shipped_run), "--format", "timm", "--out", str(tmp_path / "timm"),
                            "--with-heads"]) == 0
    backbone, heads_file = (tmp_path / "timm" / "model.safetensors", tmp_path / "timm" / "model.heads.safetensors")
    assert capsys.readouterr().out.split() == [str(backbone), str(heads_file)]
    state = torch.load(next((shipped_run / "checkpoints").glob("step_*")) / "state.pt", weights_only=True)
    heads = read_heads(heads_file)
    assert list(heads) == ["siglip2", "dinov2"]
    for name, (module, meta) in heads.items():
        assert meta["head"] == "mlp" and meta["whiten"] == "phi_s" and meta["teacher"]["model"].startswith("vit_")
        for k, v in module.state_dict().items():
            assert torch.equal(v, state["model"][f"heads.{name}.{k}"]), (name, k)
    stored = load_file(str(heads_file))
    assert torch.equal(stored["dinov2.phi_s.transform"], state["extra"]["phi_s"]["dinov2"]["transform"])
    student = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True)
    assert all(torch.equal(v, state["model"][f"encoder.{k}"]) for k, v in student.state_dict().items()
               if f"encoder.{k}" in state["model"])

    assert export_cli.main([str(shipped_run), "--format", "official", "--out", str(tmp_path / "fd.pth")]) == 0
    official = torch.load(tmp_path / "fd.pth", weights_only=True)
    assert official["fdfast"]["teachers"] == ["siglip2", "dinov2"]
    assert all(k.startswith("encoder.") for k in official["model"])  # its one decoder has no place for two heads
    assert "one decoder" in caplog.text and "siglip2, dinov2" in caplog.text


def test_single_teacher_export_with_heads_names_its_projector(tmp_path, tiny_cfg):
    cfg = tiny_cfg(train={"max_steps": 1}, checkpoint={"every": 1})
    train(cfg, DistInfo())
    assert export_cli.main([str(tmp_path / "run"), "--format", "timm", "--out", str(tmp_path / "x.safetensors"),
                            "--with-heads"]) == 0
    heads = read_heads(tmp_path / "x.heads.safetensors")
    (head, meta), = heads.values()
    assert list(heads) == ["teacher"] and isinstance(head, nn.Linear) and meta["teacher"]["kind"] == "clip"


def test_analysing_a_run_of_several_teachers_names_them_instead_of_rebuilding_one(shipped_run):
    with pytest.raises(SourceError) as e:
        load_subjects([str(shipped_run)])
    assert "2 teachers (siglip2, dinov2)" in str(e.value) and "--no-teacher" in str(e.value)
    (student,) = load_subjects([str(shipped_run)], with_teacher=False)
    assert student.role == "student" and student.projector is None


@pytest.mark.gpu
@cuda_only
def test_graphed_targets_of_two_teachers_equal_their_eager_targets(tmp_path):
    """Each teacher replays its own CUDA graph (its own memory pool; no copy of its output, read by the loss and
    backward before that graph replays again): two steps of two micro-batches, PHI-S included, give the losses
    and weights of the eager targets."""
    cuda = DistInfo(device=torch.device("cuda", 0))
    batches = uint8_batches(6, device="cuda")

    def run(graph):
        cfg = _cfg(tmp_path, [{**SIGLIP, "whiten": "phi_s"}, {**DINOV2, "head": "mlp"}], model={"phi_s_batches": 2},
                   train={"batch_size": 4, "precision": "fp32", "accum_steps": 2},
                   compile={"enabled": False, "cuda_graph_teacher": graph})
        r = build_run(cfg, cuda)
        r.task.prepare(batches[:2])
        return r, [r.step(batches[2 + 2 * i:4 + 2 * i]) for i in range(2)]
    with exact_fp32():
        eager, a = run(False)
        graphed, b = run(True)
    assert [getattr(s.target, "captures", None) for s in graphed.task.slots] == [1, 1]
    for x, y in zip(a, b):
        for k in ("loss", "loss_sig", "loss_dino"):
            assert float(y[k]) == pytest.approx(float(x[k]), rel=1e-5), k
    assert max_weight_diff(eager.task.model, graphed.task.model) < 1e-5
