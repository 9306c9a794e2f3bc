"""The repository's promises: the README's test command is what CI runs; the extension is built."""

import pathlib
import re

import alignkern
from alignkern import _backend

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _quickstart_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(?:bash|sh)?\n(.+?)\n```", section)


def test_quickstart_has_exactly_two_commands_and_ci_runs_the_test_one():
    commands = _quickstart_commands()
    assert len(commands) == 2, commands
    bench, tests = commands
    assert "alignkern bench" in bench and "pytest" in tests
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests.strip() in ci_lines


def test_extension_is_built_with_the_cpu_kernels():
    ext = _backend.extension()
    assert hasattr(ext, "token_logprobs_fwd_cpu") and hasattr(ext, "token_logprobs_bwd_cpu")
    assert isinstance(ext.has_cuda(), bool)
    if ext.has_cuda():
        assert hasattr(ext, "token_logprobs_fwd_cuda")


def test_public_api_is_exported():
    for name in alignkern.__all__:
        assert hasattr(alignkern, name)
