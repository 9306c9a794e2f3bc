"""alignkern.bench.trl_step (``alignkern bench --trl``): a DPO training step of TRL's DPOTrainer,
stock and on alignkern, at a tiny size: the rows' structure, both configurations ran on their own
kernel, the CSV and the report (the timings themselves are not tested)."""

import csv

import pytest
import torch

pytest.importorskip("trl")

from alignkern.__main__ import main  # noqa: E402
from alignkern.bench import trl_step  # noqa: E402

CPU = torch.device("cpu")
TINY = dict(vocab_size=1024, hidden_size=32, num_layers=1, intermediate_size=64, prompt_len=4,
            completion_len=8, pairs=1, warmup=1, repeats=2)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_schedule_alternates_the_configurations():
    assert trl_step._schedule(1, 2) == [trl_step.STOCK, trl_step.ALIGNKERN,
                                        trl_step.ALIGNKERN, trl_step.STOCK,
                                        trl_step.STOCK, trl_step.ALIGNKERN]


def test_both_configurations_run_a_dpo_step_on_their_own_kernel(tmp_path):
    rows = trl_step.run_trl_benchmark(CPU, quick=True, out_dir=tmp_path, **TINY)
    assert [r["provider"] for r in rows] == [trl_step.STOCK, trl_step.ALIGNKERN]
    stock, ours = rows
    for row in rows:
        assert row["case"] == "dpo_step" and row["steps"] == TINY["repeats"]
        assert "V=1024 H=32 L=1 fp32, 1 pairs x 2 x 12 tokens" in row["config"]
        assert 0 < row["ms_min"] <= row["ms"] <= row["ms_max"]
        # each step: the reference model's forward and the policy's, on the row's kernel only
        assert row["head_calls"] == 2 and row["other_kernel_calls"] == 0
        assert row["peak_mib"] is not None and row["peak_mib"] > 0  # Linux: the resident set
    assert ours["ratio"] == pytest.approx(stock["ms"] / ours["ms"])
    assert ours["memory_ratio"] == pytest.approx(stock["peak_mib"] / ours["peak_mib"])

    with open(tmp_path / "cpu-trl.csv") as f:
        written = list(csv.DictReader(f))
    assert [r["provider"] for r in written] == [trl_step.STOCK, trl_step.ALIGNKERN]
    assert {"ms", "peak_mib", "ratio", "memory_ratio", "head_calls"} <= set(written[0])
    report = trl_step.format_report(rows)
    assert "TRL DPO training step on cpu" in report and "speed-up" in report
    assert "alignkern: " in report and "x less" in report


def test_unknown_size_is_an_error():
    with pytest.raises(TypeError, match="unknown size"):
        trl_step.run_trl_benchmark(CPU, batch=3)


def test_bench_trl_prints_the_report_and_writes_its_rows(tmp_path, monkeypatch, capsys):
    calls = []
    rows = [{"case": "dpo_step", "config": "V=8", "provider": p, "device": "cpu", "threads": 1,
             "ms": ms, "ms_min": ms, "ms_max": ms, "steps": 1, "peak_mib": mib,
             "head_calls": 2, "other_kernel_calls": 0}
            for p, ms, mib in ((trl_step.STOCK, 3.0, 9.0), (trl_step.ALIGNKERN, 2.0, 3.0))]
    rows[1].update(ratio=1.5, memory_ratio=3.0)

    def fake(device=None, *, quick=False, **kwargs):
        calls.append((torch.device(device), quick))
        return rows

    monkeypatch.setattr(trl_step, "run_trl_benchmark", fake)
    assert main(["bench", "--trl", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert calls == [(CPU, True)]
    printed = capsys.readouterr().out
    assert "TRL DPO training step on cpu" in printed and "1.50x the speed" in printed
    with open(tmp_path / "cpu-trl.csv") as f:
        assert list(csv.DictReader(f))[1]["memory_ratio"] == "3.0"
    assert (tmp_path / "cpu.json").exists()
    assert main(["bench", "--trl", "--loops", "--out", str(tmp_path)]) == 2
    assert main(["bench", "--trl", "--ops", "linear_kl", "--out", str(tmp_path)]) == 2
    assert main(["bench", "--trl", "--save-results", "--out", str(tmp_path)]) == 2
    assert len(calls) == 1
