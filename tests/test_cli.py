"""The command line: `alignkern info` and `alignkern bench`."""

import csv
import subprocess
import sys

import pytest
from conftest import DEVICE, HAS_GPU

from alignkern.__main__ import info, main


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
