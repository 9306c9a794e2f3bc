"""The demos ``alignkern demo`` runs, in one table: adding a demo is one entry in ``DEMOS``.

A demo is either one of the loop demos of ``alignkern.loops.demo`` (``program`` None: that
module's function of the same name runs it, with the loop demos' options) or a program of its own
(``program``: a module whose ``main(argv) -> int`` takes the arguments after the demo's name).
This module imports neither torch's models nor transformers, so that a program such as ``ica``
runs without them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import NamedTuple


class Demo(NamedTuple):
    """``summary``: one line for ``alignkern demo --help``; ``program``: the module holding the
    demo's ``main(argv)``, or None for a loop demo of ``alignkern.loops.demo``."""

    summary: str
    program: str | None = None


DEMOS = {
    "best-of-n": Demo("8 sampled answers per prompt scored by the model itself, against RAIN's "
                      "one-at-a-time scoring; likelihood scoring against full logits"),
    "rain": Demo("RAIN's rewindable search with batched self-evaluation, against RAIN's own way "
                 "of scoring the same partial answers"),
    "check-and-correct": Demo("in-context alignment: answer, self-check, answer again with the "
                              "earlier answers and rewards in context; with and without reusing "
                              "the shared prefix's KV cache"),
    "score": Demo("SCoRe's two-attempt rollout and its stage-II loss with backward, against the "
                  "same loss on full logits"),
    "ica": Demo("in-context alignment's synthetic experiment (Wang et al. 2024) with "
                "reward_attention in the model; options of its own (alignkern demo ica --help)",
                "alignkern.examples.ica.cli"),
    "evidence": Demo("each loop against plain decoding on a small model trained here on a task "
                     "with checkable answers: accuracy with 95% intervals and cost, evidence.csv "
                     "and evidence.png; options of its own (alignkern demo evidence --help)",
                     "alignkern.examples.evidence.cli"),
}

# The loop demos, in the order `alignkern demo all` runs them.
LOOPS = tuple(name for name, demo in DEMOS.items() if demo.program is None)


def program(argv: list[str]) -> Callable[[list[str]], int] | None:
    """The ``main`` of the demo ``argv`` starts with when that demo is a program of its own
    (it takes ``argv[1:]``); None otherwise (a loop demo, an option, nothing)."""
    demo = DEMOS.get(argv[0]) if argv else None
    if demo is None or demo.program is None:
        return None
    return importlib.import_module(demo.program).main


def listing(width: int = 100) -> str:
    """Each demo's name and summary, wrapped to ``width`` columns, for ``--help``."""
    import textwrap

    names = [*DEMOS, "all"]
    column = max(map(len, names)) + 4
    lines = []
    for name in names:
        text = DEMOS[name].summary if name in DEMOS else f"the loop demos, one after another " \
            f"({', '.join(LOOPS)}); the default"
        lines += textwrap.wrap(text, width, initial_indent=f"  {name:<{column - 2}}",
                               subsequent_indent=" " * column, break_on_hyphens=False)
    return "\n".join(lines)
