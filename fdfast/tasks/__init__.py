"""Tasks the trainer runs (``base.py`` is the protocol): ``distill`` (feature distillation),
``finetune`` (fine-tuning a distilled student) and ``linprobe`` (linear probe), keyed by ``train.task``."""
from .base import Task
from .distill import DistillTask
from .evaluation import EvaluationStopped
from .finetune import FinetuneTask, ProbeTask

TASKS = {"distill": DistillTask, "finetune": FinetuneTask, "linprobe": ProbeTask}

__all__ = ["TASKS", "DistillTask", "EvaluationStopped", "FinetuneTask", "ProbeTask", "Task"]
