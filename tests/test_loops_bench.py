"""alignkern.bench.loops (``alignkern bench --loops``): its measurements compare equal scores and
count what they claim, on the tiny model (the timings themselves are not tested)."""

import csv
import inspect

import pytest
import torch

pytest.importorskip("transformers")

from test_loops_helpers import model, tokenizer  # noqa: E402

from alignkern.bench import loops as loops_bench  # noqa: E402

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_run_loops_benchmark_can_be_called_without_arguments():
    parameters = inspect.signature(loops_bench.run_loops_benchmark).parameters
    assert all(p.default is not inspect.Parameter.empty for p in parameters.values())
    assert {"device", "quick", "out_dir", "print_report"} <= set(parameters)


def test_self_eval_rows_compare_the_same_scores_and_count_the_forwards():
    rows = loops_bench.bench_self_eval(model(), tokenizer(), CPU, (3,), repeats=1)
    by = {r["provider"]: r for r in rows}
    assert set(by) == {"alignkern (prefix cached)", "alignkern (cold)", "rain-reference"}
    cached, cold, reference = (by[p] for p in ("alignkern (prefix cached)", "alignkern (cold)",
                                               "rain-reference"))
    assert cached["max_abs_diff"] < 1e-5 and cold["max_abs_diff"] < 1e-5
    # RAIN's way: one unbatched forward per candidate and option order, every position projected
    assert reference["forwards"] == 2 * 3 and reference["head_rows"] == reference["positions"]
    # ours: one batched forward on the cached prefix (cold: the prefix first), 2 rows per candidate
    assert cached["forwards"] == 1 and cold["forwards"] == 2
    assert cached["head_rows"] == cold["head_rows"] == 2 * 3
    assert cached["positions"] < cold["positions"] < reference["positions"]
    assert cached["ratio"] == pytest.approx(reference["ms"] / cached["ms"])


def test_best_of_n_rows_compare_the_same_likelihoods(tmp_path):
    rows = loops_bench.bench_best_of_n_scoring(model(), CPU, (2,), 8, 4, repeats=1)
    ours, full = rows
    assert ours["provider"] == "alignkern score_generations" and ours["max_abs_diff"] < 1e-4
    assert ours["head_rows"] == 2 * 4 and full["head_rows"] == 2 * 12
    report = loops_bench.format_report(rows)
    assert "best_of_n_scoring: Llama V=512" in report and "alignkern score_generations" in report
    path = loops_bench.write_csv(rows, CPU, tmp_path / "out")
    assert path.name == "cpu-loops.csv"
    with open(path) as f:
        written = list(csv.DictReader(f))
    assert [r["provider"] for r in written] == [r["provider"] for r in rows]
