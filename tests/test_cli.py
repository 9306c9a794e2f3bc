"""The command line: `alignkern info` and `alignkern bench`."""

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEVICE, HAS_GPU

import alignkern
from alignkern.__main__ import info, main

REPO = Path(__file__).resolve().parents[1]


def test_info_reports_versions_and_backends():
    text = info()
    for expected in ("alignkern 0.1.0", "torch", "triton", "gpu:", "triton interpreter:",
                     "triton ", "cuda ", "cpu ", "reference "):
        assert expected in text
    assert "available" in text


def test_info_shows_the_backend_in_use_and_where_it_comes_from(monkeypatch):
    monkeypatch.delenv("ALIGNKERN_BACKEND", raising=False)
    default = "triton" if HAS_GPU else "cpu"
    assert f"backend for {DEVICE.type} tensors: {default} (default)" in info()
    monkeypatch.setenv("ALIGNKERN_BACKEND", "reference")
    assert (f"backend for {DEVICE.type} tensors: reference (from ALIGNKERN_BACKEND; "
            f"the default is {default})") in info()


@pytest.mark.parametrize("name, error", [
    ("tpu", "ValueError: ALIGNKERN_BACKEND: unknown backend 'tpu'; expected one of"),
    ("cpu" if HAS_GPU else "cuda", "RuntimeError: alignkern backend"),  # known, cannot run here
], ids=["unknown", "unavailable"])
def test_info_flags_an_unusable_environment_backend_and_still_exits_0(monkeypatch, capsys, name,
                                                                      error):
    monkeypatch.setenv("ALIGNKERN_BACKEND", name)
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert f"backend for {DEVICE.type} tensors: NONE, ALIGNKERN_BACKEND={name!r} is unusable" in text
    assert error in text and "unset ALIGNKERN_BACKEND" in text


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "alignkern", "info"], capture_output=True,
                         text=True, check=True)
    assert "backends:" in out.stdout


def test_bench_quick_writes_csv_and_table(tmp_path, capsys):
    assert main(["bench", "--quick", "--device", "cpu", "--out-dir", str(tmp_path), "--no-plot",
                 "--no-progress", "--providers", "torch-eager", "read-ceiling",
                 "matmul-floor", "flash-ceiling"]) == 0
    printed = capsys.readouterr().out
    assert "alignkern bench on cpu" in printed and "torch-eager" in printed
    with open(tmp_path / "cpu.csv") as f:
        rows = list(csv.DictReader(f))
    providers = {r["provider"] for r in rows}
    assert {"alignkern", "torch-eager", "read-ceiling", "matmul-floor"} <= providers
    assert {r["kernel"] for r in rows} == {"token_logprobs", "linear_logprobs",
                                           "linear_logprobs_entropy", "reward_attention",
                                           "fused_linear_dpo_loss", "linear_kl",
                                           "plackett_luce_loss"}
    assert {r["unit"] for r in rows if r["kernel"] == "linear_logprobs"} >= {"ms", "TFLOP/s", "MiB"}
    assert "x floor" in printed and "% of read" in printed and "% of flash" in printed
    times = [r for r in rows if r["metric"] == "time" and r["provider"] == "alignkern"]
    assert {r["mode"] for r in times} == {"fwd", "fwd+bwd"}
    assert all(float(r["p50"]) > 0 for r in times)
    assert set(rows[0]) >= {"kernel", "provider", "mode", "metric", "unit", "x", "p50", "p20",
                            "p80", "config", "device", "torch", "triton", "git_sha", "timestamp"}


# ----------------------------------------------------------------------------- unusable paths

BENCH = ["bench", "--quick", "--device", "cpu", "--ops", "plackett_luce_loss", "--no-progress",
         "--no-plot", "--budget", "0.05"]


def _unusable_folders(tmp_path):
    """Folders that cannot be created: a device file, a plain file, a folder under a file."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    return {"/dev/null": "it is a file, not a folder",
            str(a_file): "it is a file, not a folder",
            str(a_file / "below"): "NotADirectoryError"}


@pytest.mark.parametrize("mode", ["ops", "loops", "trl"])
def test_bench_checks_its_output_folder_before_measuring(tmp_path, monkeypatch, capsys, mode):
    """`--out /dev/null` used to run the whole benchmark and then die with a raw FileExistsError,
    losing the results: now nothing is measured, the error names --out, the folder and why, and
    the exit status is 2 like the CLI's other errors."""
    from alignkern import bench
    from alignkern.bench import loops, trl_step

    def measured(*args, **kwargs):
        raise AssertionError("measured before the output folder was checked")

    monkeypatch.setattr(bench, "bench_family", measured)
    monkeypatch.setattr(loops, "run_loops_benchmark", measured)
    monkeypatch.setattr(trl_step, "run_trl_benchmark", measured)
    argv = {"ops": BENCH, "loops": ["bench", "--loops", "--quick", "--device", "cpu"],
            "trl": ["bench", "--trl", "--quick", "--device", "cpu"]}[mode]
    for folder, why in _unusable_folders(tmp_path).items():
        assert main([*argv, "--out", folder]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"alignkern bench: error: --out {folder!r}: cannot write the "
                                   f"results there (")
        assert why in lines[0]


def test_bench_creates_a_missing_output_folder_and_its_parents(tmp_path, monkeypatch):
    from alignkern import bench

    monkeypatch.setattr(bench, "bench_family", lambda *args, **kwargs: [])  # nothing to time
    assert main([*BENCH, "--out", str(tmp_path / "new" / "nested")]) == 0
    assert sorted(p.name for p in (tmp_path / "new" / "nested").iterdir()) == [
        "cpu.csv", "cpu.json", "cpu.md"]


@pytest.mark.parametrize("budget", ["inf", "0", "nan"])
def test_bench_budget_must_be_positive_and_finite(monkeypatch, capsys, budget):
    """An infinite budget would time a noisy case forever."""
    from alignkern import bench

    def measured(*args, **kwargs):
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(bench, "run", measured)
    with pytest.raises(SystemExit) as stop:
        main(["bench", "--budget", budget])
    assert stop.value.code == 2
    assert f"argument --budget: must be above 0 and finite, got {budget}" in capsys.readouterr().err


def _demo_folders(tmp_path):
    """--model values that are no checkpoint folder, and what the error says of each."""
    a_file = tmp_path / "weights.bin"
    a_file.write_text("")
    (tmp_path / "empty").mkdir()
    incomplete = tmp_path / "config-only"
    incomplete.mkdir()
    (incomplete / "config.json").write_text('{"model_type": "llama"}')
    return {str(tmp_path / "nonexistent"): "no such folder",
            str(a_file): "a file, not a folder",
            str(tmp_path / "empty"): "the folder has no config.json",
            str(incomplete): "cannot load a causal LM and its tokenizer from it (OSError: "}


def test_demo_model_that_is_no_checkpoint_folder_is_a_clear_error(tmp_path, capsys):
    """`--model /nonexistent` showed transformers' "Repo id must use alphanumeric chars" (a
    missing folder is taken for a hub id): now it says the folder does not exist, exit 2."""
    for folder, why in _demo_folders(tmp_path).items():
        assert main(["demo", "score", "--model", folder]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.startswith(f"alignkern demo: error: --model {folder!r}: {why}")
        assert "Repo id" not in captured.err


@pytest.mark.parametrize("seed, why", [("18446744073709551616", "must be in [-2**63, 2**64 - 1]"),
                                       ("x", "not an integer: 'x'")])
def test_demo_seed_outside_torch_range_is_refused_before_loading(monkeypatch, capsys, seed, why):
    """torch.manual_seed refuses it with a bare ValueError, after the model was built."""
    from alignkern.loops import demo

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(demo, "_load", loaded)
    with pytest.raises(SystemExit) as stop:
        main(["demo", "score", "--seed", seed])
    assert stop.value.code == 2
    assert f"alignkern demo: error: argument --seed: {why}" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the front door

ENTRY_POINT = """
import importlib, re, sys
with open("pyproject.toml") as f:  # [project.scripts] alignkern = "module:function"
    module, function = re.search(r'^alignkern = "(.+)"$', f.read(), re.M)[1].split(":")
sys.argv = ["alignkern", *sys.argv[1:]]
try:
    getattr(importlib.import_module(module), function)()
except SystemExit as stop:
    print("exit", stop.code)
print("imported torch:", "torch" in sys.modules, "alignkern:", "alignkern" in sys.modules)
"""


def _entry_point(*args):
    """Run the `alignkern` console script's function (as pyproject.toml names it) in a fresh
    interpreter from the repository root."""
    return subprocess.run([sys.executable, "-c", ENTRY_POINT, *args], capture_output=True,
                          text=True, check=True, cwd=REPO).stdout


@pytest.mark.parametrize("args", [["--version"], ["--help"], [], ["nope"]],
                         ids=["version", "help", "no-command", "unknown-command"])
def test_version_help_and_usage_errors_do_not_import_torch(args):
    """`alignkern --version` took 3 s: it imported torch (about 2 s) to print a string."""
    out = _entry_point(*args)
    assert out.endswith("imported torch: False alignkern: False\n"), out
    assert ("exit 0" in out) == (args[:1] in (["--version"], ["--help"]))
    if args == ["--version"]:
        assert out.startswith(f"alignkern {alignkern.__version__}\n")


def test_a_command_runs_through_the_console_script():
    out = _entry_point("info")
    assert "backends:" in out and out.endswith("imported torch: True alignkern: True\n")


def test_the_front_door_and_the_full_parser_print_the_same_help():
    import alignkern_cli
    from alignkern.__main__ import _parser

    assert alignkern_cli.parser().format_help() == _parser().format_help()
    assert alignkern_cli.version() == alignkern.__version__
    pyproject = (REPO / "pyproject.toml").read_text()  # one place holds the version
    assert re.search(r'^dynamic = \["version"\]', pyproject, re.M)
    assert 'version = { attr = "alignkern._version.__version__" }' in pyproject
    assert 'py-modules = ["alignkern_cli"]' in pyproject  # the front door is packaged
