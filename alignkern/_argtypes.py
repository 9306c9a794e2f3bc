"""The argparse pieces alignkern's command lines share (``alignkern demo`` and its programs): a
parser whose errors are one line, and integer argument types. Imports nothing heavy."""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line and exit status 2, like the rest of the
    CLI (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def integer(text: str) -> int:
    """An argument that must be an integer."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def positive_int(text: str) -> int:
    """An argument that must be an integer >= 1 (a count, threads)."""
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
