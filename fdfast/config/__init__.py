"""Typed configuration in sections (``sections.py``) read from YAML with overrides (``load.py``)."""
from ..errors import ConfigError
from .load import config_from_dict, dump_config, load_config, parse_override, to_dict
from .sections import (AUTO_AUGMENT_BACKENDS, AugmentConfig, CheckpointConfig, CompileConfig, DataConfig,
                       FDConfig, LogConfig, ModelConfig, OptimConfig, StudentConfig, TeacherConfig,
                       TeacherEntry, TrainConfig)

__all__ = ["AUTO_AUGMENT_BACKENDS", "AugmentConfig", "CheckpointConfig", "CompileConfig", "ConfigError",
           "DataConfig", "FDConfig", "LogConfig", "ModelConfig", "OptimConfig", "StudentConfig", "TeacherConfig",
           "TeacherEntry", "TrainConfig", "config_from_dict", "dump_config", "load_config", "parse_override",
           "to_dict"]
