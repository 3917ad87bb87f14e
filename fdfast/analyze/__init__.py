"""FD's diagnostic tools (spec §5): average attention distance per head, head diversity, attention-map
diagonality and filter-normalised loss landscapes, for distilled students, their teachers and fine-tuned
models, with a report that compares them.

Models are loaded by :mod:`fdfast.interop.sources` (shared with fdfast-eval). Modules: ``data`` (the
images), ``capture`` (attention probabilities from hooks), ``metrics`` (the statistics, per image),
``stats`` (bootstrap intervals and the rule that calls a model ahead), ``summary`` (the reported numbers
with their intervals), ``landscape``, ``plots``, ``report`` and ``run`` (the whole analysis, what
``fdfast-analyze`` calls).
"""
from .run import AnalyzeOptions, analyze

__all__ = ["AnalyzeOptions", "analyze"]
