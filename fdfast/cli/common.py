"""What the command-line faces share: whole-number argument types (argparse turns their errors into one
usage line, exit 2) and the exit convention (a user-fixable error: one line, exit 2; Ctrl-C: one line
saying what was written, exit 130; never a traceback for either)."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from ..errors import UserError


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for a whole number >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = f"int >= {minimum}"
    return parse


def exit_code(prog: str, work: Callable[[], int], *, interrupted: str,
              errors: tuple[type[BaseException], ...] = (UserError,), label: str | None = None) -> int:
    """``work()``'s exit code; an error of ``errors`` printed as ``<prog>: <label or its class name>: <message>``
    gives 2, Ctrl-C ``<prog>: interrupted; <interrupted>`` gives 130."""
    try:
        return work()
    except errors as e:
        print(f"{prog}: {label or type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {interrupted}", file=sys.stderr)
        return 130
