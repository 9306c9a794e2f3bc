"""Every ```python block of README.md and docs/**/*.md runs as written.

Each block is one test and runs in a fresh namespace, in this process: a block is an example a
reader copies on its own, so it imports everything it uses and builds its own model and
tokenizer (``alignkern.testing``). A block may be skipped only by an HTML comment on the line
right before its fence (blank lines between are allowed) that gives the reason:

    <!-- skip: needs a GPU -->
    <!-- skip: several processes -->

A block must leave the process as it found it (no TRL hook left on, no process group left
initialised, the thread count and ``ALIGNKERN_*`` variables unchanged): the test fails a block
that does not and puts the state back, so that no later test sees it.
"""

from __future__ import annotations

import os
import pathlib
import re
import sys
from typing import NamedTuple

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

FENCE = re.compile(r"^(?P<indent> *)(?P<ticks>`{3,})(?P<info>[^`\n]*)$")
SKIP = re.compile(r"^\s*<!--\s*skip:\s*(?P<reason>.*?)\s*-->\s*$")


class Block(NamedTuple):
    page: pathlib.Path
    line: int          # 1-based line of the opening fence
    language: str      # the fence's info string, first word ("" when none)
    code: str
    skip: str | None   # the reason, when marked


def blocks(page: pathlib.Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, in order."""
    return blocks_of_text(page.read_text(), page)


def blocks_of_text(text: str, page: pathlib.Path) -> list[Block]:
    """The fenced code blocks of ``text`` (the contents of ``page``), in order."""
    lines = text.splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, ticks = len(opening["indent"]), opening["ticks"]
        body, j = [], i + 1
        while j < len(lines) and not re.match(rf"^ *{ticks}`*\s*$", lines[j]):
            body.append(_dedent(lines[j], indent))
            j += 1
        found.append(Block(page, i + 1, (opening["info"].split() or [""])[0], "\n".join(body),
                           _skip_reason(lines, i)))
        i = j + 1
    return found


def _dedent(line: str, indent: int) -> str:
    """The line without the fence's indentation (a block inside a list item is indented)."""
    spaces = len(line) - len(line.lstrip(" "))
    return line[min(indent, spaces):]


def _skip_reason(lines: list[str], fence: int) -> str | None:
    k = fence - 1
    while k >= 0 and not lines[k].strip():
        k -= 1
    marked = SKIP.match(lines[k]) if k >= 0 else None
    return marked["reason"] if marked else None


def _name(block: Block) -> str:
    return f"{block.page.relative_to(ROOT)}:{block.line}"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is the fastest

PYTHON_BLOCKS = [b for page in PAGES for b in blocks(page) if b.language in ("python", "py")]


# ----------------------------------------------------------------------------- the process state


class _State(NamedTuple):
    threads: int
    env: dict
    trl_handles: int
    process_group: bool
    grad_enabled: bool


def _state() -> _State:
    trl = sys.modules.get("alignkern.integrations.trl")
    dist = torch.distributed
    return _State(torch.get_num_threads(),
                  {k: v for k, v in os.environ.items() if k.startswith("ALIGNKERN_")},
                  trl._open_handles if trl is not None else 0,
                  dist.is_available() and dist.is_initialized(),
                  torch.is_grad_enabled())


def _restore(before: _State) -> None:
    torch.set_num_threads(before.threads)
    for key in [k for k in os.environ if k.startswith("ALIGNKERN_")]:
        del os.environ[key]
    os.environ.update(before.env)
    torch.set_grad_enabled(before.grad_enabled)
    trl = sys.modules.get("alignkern.integrations.trl")
    if trl is not None:
        while trl._global_handles:
            trl._release_global()
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and not before.process_group:
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=_name)
def test_python_block_runs_as_written(block: Block):
    if block.skip is not None:
        pytest.skip(block.skip)
    before = _state()
    torch.manual_seed(0)
    namespace = {"__name__": "__docs_example__"}
    try:
        exec(compile(block.code, _name(block), "exec"), namespace)
    finally:
        after = _state()
        _restore(before)
    assert after == before, (
        f"{_name(block)} left the process changed (a block must undo what it switches on): "
        f"before {before}, after {after}")


def test_there_are_examples_to_run():
    """The collection itself: every guide, the home page and the README have runnable blocks; a block
    inside a list item is found and dedented."""
    runnable = {b.page.relative_to(ROOT).as_posix() for b in PYTHON_BLOCKS if b.skip is None}
    guides = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs" / "guides").glob("*.md")}
    benchmarks = "docs/guides/benchmarks.md"          # commands only: bash blocks
    assert guides - {benchmarks} <= runnable and {"docs/index.md", "README.md"} <= runnable, runnable

    page = ROOT / "docs" / "index.md"
    listed = blocks_of_text("- an item\n\n    ```python\n    x = 1\n      y = 2\n    ```\n", page)
    assert [(b.language, b.code) for b in listed] == [("python", "x = 1\n  y = 2")]


def test_every_docs_block_says_its_language_and_every_skip_has_a_reason():
    """An untagged fence would hide a Python example from the run above; a skip marker must
    stand right before a Python block and give a reason."""
    for page in (ROOT / "docs").rglob("*.md"):
        text = page.read_text().splitlines()
        fenced = blocks(page)
        for block in fenced:
            assert block.language, f"{_name(block)}: a fence without a language"
        python_fences = {b.line for b in fenced if b.language in ("python", "py")}
        for number, line in enumerate(text, start=1):
            marked = SKIP.match(line)
            if not marked:
                continue
            assert marked["reason"], f"{page.relative_to(ROOT)}:{number}: a skip without a reason"
            following = next((n for n in range(number + 1, len(text) + 1)
                              if text[n - 1].strip()), None)
            assert following in python_fences, (
                f"{page.relative_to(ROOT)}:{number}: a skip marker not right before a python block")
