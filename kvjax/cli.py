"""Shared pieces of kvjax's command lines: an ArgumentParser whose errors are one `error: ...`
line and exit 2 (like every other user error), and integer argparse types with clear messages."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from kvjax.errors import KVJaxError


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every other user error
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def int_at_least(low: int):
    """argparse type: an integer >= low, with a message that says so."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value
    return parse


positive_int, non_negative_int = int_at_least(1), int_at_least(0)


def run_cli(body: Callable[[], int]) -> int:
    """Run a command's body: a KVJaxError becomes one `error: ...` line and exit code 2, Ctrl-C 130."""
    # transformers advises installing PyTorch when it is absent; kvjax runs on JAX alone.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        return body()
    except KVJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
