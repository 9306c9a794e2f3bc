"""The documentation site's API reference covers the public API.

The reference pages (docs/api/*.md) are mkdocstrings directives (``::: alignkern.token_logprobs``)
rendered from the docstrings; the pages that list objects one by one, in sections, would silently
leave out a name added to a module's ``__all__`` later. This test names it. The build itself
(``mkdocs build --strict``: links, anchors, the nav, docstrings griffe can read) runs in CI
(.ci/docs).
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
API_PAGES = sorted((ROOT / "docs" / "api").glob("*.md"))

DIRECTIVE = re.compile(r"^::: (?P<path>[\w.]+)\s*$")

# The modules whose public names the reference must show; each has a page.
MODULES = ["alignkern", "alignkern.losses", "alignkern.integrations.transformers",
           "alignkern.integrations.trl", "alignkern.loops", "alignkern.distributed",
           "alignkern.testing"]


def directives(text: str) -> list[tuple[str, bool]]:
    """``(object path, members shown)`` for each ``:::`` directive of a page: ``members: false``
    in its options block hides a module's members."""
    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines):
        match = DIRECTIVE.match(line)
        if not match:
            continue
        options = []
        for following in lines[i + 1:]:
            if following.strip() and not following.startswith(" "):
                break
            options.append(following.strip())
        found.append((match["path"], "members: false" not in options))
    return found


def public_names(module) -> list[str]:
    """``__all__``, or where a module has none, the functions and classes it defines without a
    leading underscore."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [name for name, value in vars(module).items()
            if not name.startswith("_") and (inspect.isfunction(value) or inspect.isclass(value))
            and value.__module__ == module.__name__]


def covered(module: str, name: str, shown: list[tuple[str, bool]]) -> bool:
    """Whether a directive renders ``module.name``: the module with its members, or the object
    itself, by its public path or by the submodule that defines it
    (``alignkern.loops.best_of_n.best_of_n``)."""
    for path, members in shown:
        if path == module and members:
            return True
        if path.startswith(module + ".") and path.rsplit(".", 1)[-1] == name:
            return True
    return False


def test_the_directives_are_read():
    """The parser finds the pages' directives (so that the test below is not vacuous)."""
    text = "# t\n\n::: alignkern.loops\n    options:\n      members: false\n\n::: alignkern.BACKENDS\n"
    assert directives(text) == [("alignkern.loops", False), ("alignkern.BACKENDS", True)]
    assert not covered("alignkern.loops", "best_of_n", directives(text))
    assert covered("alignkern", "BACKENDS", directives(text))


@pytest.mark.parametrize("module_name", MODULES)
def test_every_public_name_is_in_the_api_reference(module_name):
    pytest.importorskip("transformers")
    if module_name.endswith(".trl"):
        pytest.importorskip("trl")
    module = importlib.import_module(module_name)
    shown = [d for page in API_PAGES for d in directives(page.read_text())]
    missing = [name for name in public_names(module) if not covered(module_name, name, shown)]
    assert not missing, (f"{module_name}: {missing} are public but no page of docs/api/ renders "
                         f"them (add a '::: {module_name}.<name>' directive)")
