"""The vocabulary-parallel benchmark (alignkern.bench.distributed) at a tiny size on 2 gloo ranks:
both ways agree (checked inside the ranks before timing), and the bytes counted by the wrapped
collectives equal what the code is documented to send."""

from __future__ import annotations

import csv

import pytest

from alignkern.bench import distributed as bench

N, H, V, WORLD = 24, 16, 1000, 2


@pytest.fixture(scope="module")
def rows():
    plan = [(op, N, H, V) for op in bench.OPS]
    return bench.run(WORLD, plan, warmup=1, steps=2, limit_s=90)


def _row(rows, op, way):
    (found,) = [r for r in rows if r["op"] == op and r["way"] == way]
    return found


@pytest.mark.parametrize("op", bench.OPS)
def test_bytes_match_the_formula(rows, op):
    v_local = V // WORLD
    dhidden = N * H * 4 if op == "linear_logprobs" else 0
    ak, naive = _row(rows, op, "alignkern"), _row(rows, op, "naive")
    # alignkern forward: setup all-gather (16 int64 from each of 2 ranks), all-reduce (max) of N
    # fp32, all-reduce (sum) of N·(K + 1) fp32, K = 1; backward: dhidden (linear only)
    assert ak["fwd_bytes"] == WORLD * 16 * 8 + N * 4 + N * 2 * 4
    assert ak["bwd_bytes"] == dhidden
    assert (ak["collectives_fwd"], ak["collectives_bwd"]) == (3, 1 if dhidden else 0)
    # naive forward: the all-gather of the (N, V_local) fp32 logits shards into (N, V)
    assert naive["fwd_bytes"] == N * v_local * WORLD * 4
    assert naive["bwd_bytes"] == dhidden
    assert (naive["collectives_fwd"], naive["collectives_bwd"]) == (1, 1 if dhidden else 0)
    assert (ak["fwd_bytes"], ak["bwd_bytes"]) == bench.expected_bytes(op, "alignkern", N, H,
                                                                       v_local, WORLD)
    assert (naive["fwd_bytes"], naive["bwd_bytes"]) == bench.expected_bytes(op, "naive", N, H,
                                                                             v_local, WORLD)
    # ring estimates: all-reduce 2(p-1)/p of the buffer, all-gather (p-1)/p of the result
    assert naive["ring_fwd_bytes"] == N * V * 4 // 2
    assert ak["ring_bwd_bytes"] == dhidden
    for r in (ak, naive):
        assert r["step_bytes"] == r["fwd_bytes"] + r["bwd_bytes"]
        assert r["ms_median"] > 0 and r["steps"] == 2


def test_table_and_csv(rows, tmp_path):
    text = bench.table(rows)
    assert max(len(line) for line in text.splitlines()) <= 120
    assert "linear_logprobs" in text and "token_logprobs" in text
    path = bench.write_csv(rows, tmp_path)
    with path.open() as f:
        read = list(csv.DictReader(f))
    assert len(read) == 4 and list(read[0]) == bench.FIELDS
