"""The command line: `alignkern info` and `alignkern bench`."""

import csv
import subprocess
import sys

from alignkern.__main__ import info, main


def test_info_reports_versions_and_backends():
    text = info()
    for expected in ("alignkern 0.1.0", "torch", "triton", "gpu:", "triton interpreter:",
                     "triton ", "cuda ", "cpu ", "reference "):
        assert expected in text
    assert "available" in text


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
    assert {r["kernel"] for r in rows} == {"token_logprobs", "linear_logprobs", "reward_attention",
                                           "fused_linear_dpo_loss", "linear_kl",
                                           "plackett_luce_loss"}
    assert {r["unit"] for r in rows if r["kernel"] == "linear_logprobs"} >= {"ms", "TFLOP/s", "MiB"}
    assert "x floor" in printed and "% of read" in printed and "% of flash" in printed
    times = [r for r in rows if r["metric"] == "time" and r["provider"] == "alignkern"]
    assert {r["mode"] for r in times} == {"fwd", "fwd+bwd"}
    assert all(float(r["p50"]) > 0 for r in times)
    assert set(rows[0]) >= {"kernel", "provider", "mode", "metric", "unit", "x", "p50", "p20",
                            "p80", "config", "device", "torch", "triton", "git_sha", "timestamp"}
