"""Constants with one definition: pixel statistics shared by the FD step, the teachers, fine-tuning and
evaluation; the command-line switch that allows files which run code when unpickled."""
from __future__ import annotations

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TRUST_SWITCH = "--trust-pickle"
"""Sets ``trust_pickle`` (see :mod:`fdfast.interop.reading`): every command that reads model files takes it, and
only the command line grants it, never a config, a checkpoint or a run folder."""
