"""The class count of a fine-tune or probe, settled before any model is built: ``data.num_classes`` read
from ``data.train`` when unset, ``model.student.num_classes`` (0) following it, and a disagreement between
what the config says and what the data hold stopped with one line before a single weight is loaded."""
from __future__ import annotations

import dataclasses

from pipelines.classes import data_classes

from ..config import ConfigError, FDConfig
from ..config.data import SYNTHETIC_CLASSES


def resolve_num_classes(cfg: FDConfig) -> FDConfig:
    """``cfg`` with ``data.num_classes`` and ``model.student.num_classes`` both set to the classes of the data
    (a distillation has no head and is returned as is). Raises :class:`ConfigError` where the config names
    a count that ``data.train`` does not hold."""
    if cfg.train.task == "distill":
        return cfg
    data, student = cfg.data, cfg.model.student
    found = data_classes(data)
    where = f"data.train={data.train!r} holds {found} classes"
    if found is not None and data.num_classes not in (None, found):
        raise ConfigError(f"data.num_classes={data.num_classes} but {where}; set data.num_classes={found}, or "
                          "leave it unset (null) to read it from the data")
    classes = found or data.num_classes or student.num_classes or SYNTHETIC_CLASSES
    if student.num_classes not in (0, classes):
        said = where if found is not None else f"data.num_classes={classes}"
        raise ConfigError(f"model.student.num_classes={student.num_classes} but {said}; the classifier and the "
                          f"labels must agree: set model.student.num_classes={classes}, or 0 to follow the data")
    if (data.num_classes, student.num_classes) == (classes, classes):
        return cfg
    model = dataclasses.replace(cfg.model, student=dataclasses.replace(student, num_classes=classes))
    return dataclasses.replace(cfg, data=dataclasses.replace(data, num_classes=classes), model=model)
