"""The one base class of errors a user can fix (a config key, a file, an optional library).

Every such error subclasses :class:`UserError`; the command-line faces catch it, print its one-line
message and exit with code 2, never a traceback. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input the user can fix; the message names the file / key / value and what to do."""


class ConfigError(UserError, ValueError):
    """A config that cannot be used; the message says which key and how to fix it."""


class OutputNotWritable(UserError, OSError):
    """An output folder or file (``train.output_dir``, a .beton, an export) cannot be created or written."""


class MissingDependency(UserError, ImportError):
    """An optional library (FFCV, DALI, ...) is not installed; the message says how to install it."""
