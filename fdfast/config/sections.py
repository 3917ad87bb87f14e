"""The config schema: one ``kw_only`` dataclass per section, each checking itself in ``__post_init__``.

Sections: ``model`` (student, teacher, objective, weights to start from), ``data`` (what the loader
reads and how it crops), ``augment`` (on-device batch augmentation of fine-tuning), ``optim``,
``train`` (the loop), ``compile`` (torch.compile and the CUDA-graph teacher), ``checkpoint`` and
``log``. A check that involves two sections lives in :class:`FDConfig`. Every failure raises
:class:`~fdfast.errors.ConfigError` naming the key, the value and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .checks import need
from .data import AUTO_AUGMENT_BACKENDS, AugmentConfig, DataConfig, official_eval_resize
from .model import ModelConfig, StudentConfig, TeacherConfig, TeacherEntry
from .run import CheckpointConfig, CompileConfig, LogConfig, OptimConfig, TrainConfig

__all__ = ["AUTO_AUGMENT_BACKENDS", "AugmentConfig", "CheckpointConfig", "CompileConfig", "DataConfig", "FDConfig",
           "LogConfig", "ModelConfig", "OptimConfig", "StudentConfig", "TeacherConfig",
           "TeacherEntry", "TrainConfig"]


@dataclass(kw_only=True)
class FDConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        """Checks that involve more than one section."""
        s, tr = self.model.student, self.train
        if tr.task == "distill":
            need(s.num_classes == 0, "model.student.num_classes must be 0 for train.task='distill'")
            # the loss is index-aligned, so both token grids must match; checked again on the built models
            # (kind timm: by the token rules of models/token_rules.py, which know the teacher's layout)
            for t in self.model.teacher_configs:
                need(not (s.arch == "beit" and t.kind == "esvit"),
                     f"{t.key}.kind='esvit' (49 Swin tokens) needs model.student.arch='swinv2'")
                need(not (s.arch == "swinv2" and t.kind not in ("esvit", "timm")),
                     f"student arch 'swinv2' has no CLS token; {t.key}.kind={t.kind!r} needs "
                     "model.student.arch='beit'")
            # the student starts from random init (spec); a path here would be silently unread
            need(not self.model.pretrained,
                 f"model.pretrained={self.model.pretrained!r} is read by train.task='finetune' and 'linprobe' "
                 "only: distillation trains the student from random init. To continue a distillation run, "
                 "use train.resume=PATH (or rerun in the same train.output_dir)")
        else:
            # model.student.num_classes 0 follows data.num_classes, itself read from the data when unset
            need(not s.num_classes or self.data.num_classes in (None, s.num_classes),
                 f"model.student.num_classes={s.num_classes} but data.num_classes={self.data.num_classes}; the "
                 "classifier and the labels must agree: set one of them (or neither: both are then read from "
                 "data.train)")
            need(not (self.augment.mixing and tr.batch_size % 2),
                 f"train.batch_size={tr.batch_size} is odd, but mixup/cutmix (augment.mixup={self.augment.mixup}, "
                 f"augment.cutmix={self.augment.cutmix}) pairs each image with its mirror in the batch (timm "
                 "Mixup, mode='batch') and needs an even per-device batch: make train.batch_size even")
        if tr.task == "linprobe":
            need(self.optim.optimizer == "lars", "train.task='linprobe' uses optim.optimizer='lars'")
            need(self.optim.layer_decay == 1.0,
                 f"optim.layer_decay={self.optim.layer_decay} has no effect in a linear probe (only the head "
                 "trains); set optim.layer_decay=1.0")
        if self.compile.cuda_graph_teacher:
            need(tr.task == "distill", "compile.cuda_graph_teacher only applies to train.task='distill'")
        d = self.data
        if d.eval_resize is None:  # resolved here, so config.yaml, checkpoints and exports record the value used
            d.eval_resize = d.eval_resize_at(s.img_size)
        # below the crop, torchvision would pad the centre crop with black and FFCV / DALI cannot crop at all
        need(d.eval_resize >= s.img_size,
             f"data.eval_resize={d.eval_resize} is smaller than model.student.img_size={s.img_size}: the evaluation "
             "resizes the shorter side to data.eval_resize, then centre-crops model.student.img_size. Set "
             f"data.eval_resize >= {s.img_size}, or leave it unset for the official int(256 / 224 * img_size) = "
             f"{official_eval_resize(s.img_size)}")
        need(not (self.model.attention == "flex" and s.arch != "beit"),
             "model.attention='flex' applies to the Beit (ViT) student; SwinV2's cosine attention has no flex "
             "path: use model.attention=sdpa")
        if tr.knn_every:
            self._check_knn()

    def _check_knn(self) -> None:
        tr, d = self.train, self.data
        need(tr.task == "distill", f"train.knn_every={tr.knn_every} monitors a distillation; train.task={tr.task!r} "
             "measures top-1 on data.val every train.eval_every epochs: set train.knn_every=0")
        need(d.backend != "synthetic", f"train.knn_every={tr.knn_every} needs labelled images, and "
             "data.backend='synthetic' has none: use an ImageFolder or .beton backend, or train.knn_every=0")
        missing = [f"data.{k}" for k in ("val", "knn_train") if not getattr(d, k)]
        need(not missing, f"train.knn_every={tr.knn_every} needs data.val (the images classified) and "
             f"data.knn_train (the labelled images searched): set {' and '.join(missing)}")
        need(not (self.model.student.arch == "swinv2" and tr.knn_feature == "cls"),
             "train.knn_feature='cls': a SwinV2 student has no CLS token; set train.knn_feature=mean")
