"""The ``alignkern`` command's front door: ``alignkern --version`` and ``alignkern --help`` answer
here without importing torch (which takes about 2 s); a command (``info``, ``bench``, ``demo``) is
handed to :mod:`alignkern.__main__`, which builds the full parser.

This is a module of its own, outside the ``alignkern`` package, because importing anything inside
that package first runs ``alignkern/__init__.py``, which imports torch and registers the ops.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

DESCRIPTION = """alignkern: fused kernels for LLM self-correction and in-context alignment loops.
Run "alignkern <command> --help" for a command's options."""

# Each command and its one-line help, in the order --help lists them.
COMMANDS = {
    "info": "what is installed and which kernels can run here",
    "bench": "time alignkern's ops against their peers",
    "demo": "run a demo: alignkern's loops end to end on a tiny model, with what they cost and "
            "a verdict, and the experiments (alignkern demo --help lists them)",
}


def version() -> str:
    """The version of the alignkern that ``import alignkern`` would load, read from its
    ``_version.py`` without importing the package; 'unknown' when there is none."""
    spec = importlib.util.find_spec("alignkern")
    if spec is None or not spec.origin:
        return "unknown"
    namespace: dict = {}
    path = Path(spec.origin).with_name("_version.py")
    try:
        exec(compile(path.read_text(), str(path), "exec"), namespace)
    except OSError:
        return "unknown"
    return namespace.get("__version__", "unknown")


def parser(commands: dict[str, Callable] | None = None) -> argparse.ArgumentParser:
    """The top-level parser. ``commands`` maps a command's name to a function that adds its full
    subparser (``add(subparsers, name, help)``); a command without one gets a stub that passes its
    arguments on, which is all ``--help`` and ``--version`` need."""
    top = argparse.ArgumentParser(prog="alignkern", description=DESCRIPTION,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--version", action="version", version=f"alignkern {version()}")
    sub = top.add_subparsers(dest="command", required=True, metavar="command")
    for name, text in COMMANDS.items():
        add = (commands or {}).get(name)
        if add is None:
            sub.add_parser(name, help=text, add_help=False)
        else:
            add(sub, name, text)
    return top


def main(argv: list[str] | None = None) -> int:
    """``alignkern ...``: --help, --version and a missing or unknown command are answered here;
    a command runs through alignkern.__main__ (which imports torch)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser().parse_known_args(argv)  # exits for --help, --version, no command or an unknown one
    from alignkern.__main__ import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
