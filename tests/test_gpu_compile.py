"""Every GPU kernel compiles for sm_80 and sm_90 within the chips' limits, proven without a GPU.

Triton: ``tests/gpu_compile.py`` (run here in a subprocess without TRITON_INTERPRET, which the
rest of the suite sets) compiles the core tier of every ``@triton.jit`` kernel with the bundled
ptxas; see its docstring for what the tier holds and ``python tests/gpu_compile.py --all`` for
the whole product. Compiles are cached per kernel source, specialisation and Triton version under
``$ALIGNKERN_COMPILE_CACHE`` (default ``~/.cache/alignkern/gpu-compile``).

Each Triton version compiles differently (registers, spills, what ``tl.dot`` accepts), so the
compile tests run once per interpreter: this one, and each Python named in
``$ALIGNKERN_GPU_COMPILE_PYTHONS`` (``os.pathsep``-separated; it needs torch and triton, and gets
this tree first on its PYTHONPATH, so alignkern need not be installed there). CI names one with
the GPU machines' Triton 3.6 (``.ci/triton36``), so a kernel that only the newer Triton compiles,
or that spills only under the older one, fails.

CUDA: the cubins of the built ``alignkern._C`` are read with ``cuobjdump -res-usage``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import alignkern
from alignkern.triton_kernels import _tuning
from alignkern.triton_kernels import linear_kl as kl_kernels
from alignkern.triton_kernels import linear_logprobs as linear_kernels
from alignkern.triton_kernels import reward_attention as attention_kernels
from alignkern.triton_kernels import token_logprobs as token_kernels

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_compile  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Every kernel in alignkern/triton_kernels today. A new kernel must get a compile case (the test
# below fails on a kernel without one); this list only guards the kernel discovery itself.
KNOWN_KERNELS = {
    "_token_logprobs_fwd_kernel",
    "_token_logprobs_dense_bwd_kernel",
    "_linear_logprobs_fwd_kernel",
    "_linear_logprobs_dlogits_kernel",
    "_linear_kl_fwd_kernel",
    "_linear_kl_dlogits_kernel",
    "_reward_attention_fwd_kernel",
    "_reward_attention_dkdv_kernel",
    "_reward_attention_dq_kernel",
}


def _pythons() -> list[str]:
    """The interpreters that compile the core tier: this one, then those of
    ``$ALIGNKERN_GPU_COMPILE_PYTHONS``."""
    extra = os.environ.get("ALIGNKERN_GPU_COMPILE_PYTHONS", "").split(os.pathsep)
    return [sys.executable, *(p for p in extra if p.strip())]


def _triton_version(python: str) -> str:
    """``triton-3.9.0``: the test id of the interpreter's compiles (``python``'s path when its
    triton does not import; the fixture then fails with the reason)."""
    if python == sys.executable:
        import triton

        return f"triton-{triton.__version__}"
    try:
        done = subprocess.run(
            [python, "-c", "import triton; print(triton.__version__)"], capture_output=True, text=True
        )
    except OSError:  # no such interpreter: the fixture fails with the reason
        return python
    return f"triton-{done.stdout.strip()}" if done.returncode == 0 else python


PYTHONS = _pythons()


def _subprocess_env() -> dict:
    """The compile runs without the interpreter and imports alignkern from this tree."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


@pytest.fixture(scope="module", params=PYTHONS, ids=[_triton_version(p) for p in PYTHONS])
def compiled(request, tmp_path_factory) -> dict:
    """The core tier's records under one interpreter's Triton (one subprocess; cached compiles
    come back at once)."""
    out = tmp_path_factory.mktemp("gpu-compile") / "records.json"
    done = subprocess.run(
        [request.param, str(ROOT / "tests" / "gpu_compile.py"), "--json", str(out), "--report"],
        cwd=ROOT,
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if not out.exists():
        pytest.fail(
            f"gpu_compile.py did not finish (rc {done.returncode}):\n"
            f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        )
    result = json.loads(out.read_text())
    result["stdout"] = done.stdout
    return result


def test_kernel_discovery_finds_every_kernel():
    assert set(gpu_compile.kernels_found()) >= KNOWN_KERNELS


def test_every_kernel_and_configuration_has_a_compile(compiled):
    assert compiled["records"], "no compiles"
    covered = {r["kernel"] for r in compiled["records"]}
    missing = sorted(set(compiled["kernels"]) - covered)
    assert not missing, f"kernels without a compile case: {missing}"
    # Every configuration of every bfloat16 space is compiled for both architectures.
    seen = {(r["kernel"], r["config"], r["arch"]) for r in compiled["records"]}
    for r in compiled["records"]:
        if r["dtype"] == "bf16" and r["shape"] == "aligned":
            for arch in gpu_compile.ARCHS:
                assert (r["kernel"], r["config"], arch) in seen


def test_compiles_within_shared_memory_and_without_spills(compiled):
    found = gpu_compile.problems(compiled)
    assert not found, "\n".join(found)
    for r in compiled["records"]:
        # The fields the check reads exist: a parse failure must not pass as "no spills".
        assert r["regs"] and r["spill_stores"] is not None and r["spill_loads"] is not None, r


def test_half_precision_dots_on_sm90_are_recorded(compiled, capsys):
    """Where a bfloat16/float16 tl.dot lowers to mma.sync instead of wgmma on sm_90: recorded,
    not a failure (a small tile or a transposed operand can leave Hopper's wgmma unused)."""
    sm90 = [
        r
        for r in compiled["records"]
        if r["arch"] == 90 and r["dtype"] == "bf16" and not r["family"].startswith("token")
    ]
    assert sm90 and all(r["ok"] for r in sm90)
    # The counting works: the logits-tile product of linear_logprobs lowers to wgmma.
    assert any(r["wgmma"] for r in sm90 if r["kernel"] == "_linear_logprobs_fwd_kernel")
    # And the sm_80 compiles never contain wgmma.
    assert not any(r.get("wgmma") for r in compiled["records"] if r["arch"] == 80)
    with capsys.disabled():
        for r in gpu_compile.not_wgmma(compiled):
            print(
                f"\n[sm_90 mma.sync] {r['kernel']} [{r['config']}] {r['case']}: "
                f"{r['wgmma']} wgmma, {r['mma']} mma.sync"
            )


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def _launched(monkeypatch, call) -> list:
    plans = []
    monkeypatch.setattr(_tuning, "launch", plans.append)
    call()
    return plans


def test_launchers_launch_the_plans_the_compile_test_builds(monkeypatch):
    """The public launchers go through the plan functions gpu_compile.py calls: same kernel,
    same argument specialisation, same meta-parameters and tuning space."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the GPU spaces, not the interpreter's
    n, vocab, hidden = 16, 1000, 64
    logits = _meta(n, vocab, dtype=torch.bfloat16)
    offsets, targets = _meta(n, dtype=torch.int64), _meta(n, 2, dtype=torch.int64)
    out, lse = _meta(n, 2), _meta(n)
    pairs = [
        (
            _launched(
                monkeypatch,
                lambda: token_kernels.token_logprobs_fwd(
                    logits, offsets, vocab, targets, out, lse, lse, 0.7, -100
                ),
            ),
            token_kernels._fwd_plan(logits, offsets, vocab, targets, out, lse, lse, 0.7, -100),
        )
    ]
    h, w = _meta(n, hidden, dtype=torch.bfloat16), _meta(vocab, hidden, dtype=torch.bfloat16)
    for stats in (frozenset(), frozenset(linear_kernels.STATS)):
        pairs.append(
            (
                _launched(
                    monkeypatch,
                    lambda stats=stats: linear_kernels.linear_logprobs_fwd(
                        h, w, None, 0.7, 30.0, 0.5, stats
                    ),
                ),
                linear_kernels._fwd_plan(h, w, None, 0.7, 30.0, 0.5, stats)[0],
            )
        )
    # a head of lower precision than the hidden states (its tiles converted in the kernel)
    h32 = _meta(n, hidden)
    pairs.append(
        (
            _launched(
                monkeypatch, lambda: linear_kernels.linear_logprobs_fwd(h32, w, None, 0.7, 30.0, 0.5)
            ),
            linear_kernels._fwd_plan(h32, w, None, 0.7, 30.0, 0.5)[0],
        )
    )
    dlogits = _meta(n, vocab, dtype=torch.bfloat16)
    pairs.append(
        (
            _launched(
                monkeypatch,
                lambda: linear_kernels.linear_logprobs_dlogits(
                    h, w, None, lse, lse, lse, dlogits, 0.7, 30.0, 0.5, entropy_grad=lse
                ),
            ),
            linear_kernels._dlogits_plan(h, w, None, lse, lse, lse, dlogits, 0.7, 30.0, 0.5, lse),
        )
    )
    kl_rows = [lse] * 6
    pairs.append(
        (
            _launched(monkeypatch, lambda: kl_kernels.linear_kl_fwd(h, w, h, w, *kl_rows, 0.7)),
            kl_kernels._fwd_plan(h, w, h, w, *kl_rows, 0.7),
        )
    )
    q = _meta(1, 2, 64, 64, dtype=torch.bfloat16)
    stats = _meta(1, 2, 64)
    pairs.append(
        (
            _launched(
                monkeypatch,
                lambda: attention_kernels.reward_attention_fwd(
                    q, q, q, None, None, None, True, 0.125, q, stats
                ),
            ),
            attention_kernels._fwd_plan(q, q, q, None, None, None, True, 0.125, q, stats),
        )
    )
    for launched, planned in pairs:
        assert len(launched) == 1
        got = launched[0]
        assert got.kernel is planned.kernel
        assert [gpu_compile._arg_spec(a) for a in got.args] == [
            gpu_compile._arg_spec(a) for a in planned.args
        ]
        assert got.constexprs == planned.constexprs and got.options == planned.options
        assert [_tuning.config_label(c) for c in got.configs] == [
            _tuning.config_label(c) for c in planned.configs
        ]
        assert len(got.configs) >= 1 and got.key


def test_problems_catches_spills_and_shared_memory():
    """The check can fail: a record over the sm_80 limit or with spills is reported."""
    record = dict(
        kernel="k",
        case="c",
        config="x",
        arch=80,
        ok=True,
        shared=166_913,
        regs=128,
        spill_stores=0,
        spill_loads=0,
    )
    spilled = dict(record, arch=90, shared=1024, spill_stores=8, spill_loads=8)
    broken = dict(record, ok=False, error="CompilationError: boom")
    found = gpu_compile.problems(dict(records=[record, spilled, broken], kernels=["k", "other"]))
    assert any("shared memory 166913" in f for f in found)
    assert any("spills 8 B" in f for f in found)
    assert any("does not compile" in f for f in found)
    assert "no compile case for other" in found


def test_compile_errors_end_with_their_cause():
    """Triton's CompilationError ends with a caret under the kernel's line; the reported line is
    the exception that caused it, with the source line that raised it (Triton 3.6 rejects a
    float64 accumulator in ``tl.dot`` with a bare ``assert``)."""

    def tl_dot():
        raise AssertionError  # what a bare assert in triton.language raises

    try:
        try:
            tl_dot()
        except AssertionError as cause:
            raise RuntimeError("at 18:15:\n    z, y = _both_tiles(...)\n           ^") from cause
    except RuntimeError as exc:
        error = gpu_compile._error_text(exc)
    record = dict(kernel="k", case="c", config="x", arch=80, ok=False, error=error)
    (found,) = gpu_compile.problems(dict(records=[record], kernels=["k"]))
    assert found.startswith("does not compile: k sm_80 [x] c: caused by AssertionError")
    assert "test_gpu_compile.py:" in found and "raise AssertionError" in found


def _built_module() -> Path | None:
    try:
        from alignkern import _C
    except ImportError:
        return None
    return Path(_C.__file__) if getattr(_C, "has_cuda", lambda: False)() else None


def test_cuda_kernels_have_no_spills_or_local_memory(capsys):
    module = _built_module()
    if module is None:
        pytest.skip("alignkern._C was built without the CUDA kernels")
    if gpu_compile.cuobjdump() is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton wheel)")
    records = gpu_compile.cuda_resources(module)
    with capsys.disabled():
        print("\n" + gpu_compile.cuda_report(records))
    archs = {r["arch"] for r in records}
    assert archs >= {80, 90}, f"cubins for {sorted(archs)}"
    text = " ".join(r.get("name", r["kernel"]) for r in records)
    for family in (
        "token_logprobs_fwd_kernel",
        "token_logprobs_bwd_kernel",
        "linear_logprobs_lse_kernel",
        "reward_attention_fwd_kernel",
    ):
        assert family in text, f"{family} not in the module's cubins"
    for r in records:
        assert "reg" in r and "stack" in r and "local" in r, r
    found = gpu_compile.cuda_problems(records)
    assert not found, "\n".join(found)


def test_cuda_problems_catches_stack_and_local_memory():
    records = [
        dict(kernel="a", arch=80, reg=64, stack=0, shared=0, local=0),
        dict(kernel="b", arch=90, reg=255, stack=16, shared=0, local=0),
        dict(kernel="c", arch=90, reg=255, stack=0, shared=0, local=8),
    ]
    found = gpu_compile.cuda_problems(records)
    assert len(found) == 2 and found[0].startswith("b ") and found[1].startswith("c ")


def test_alignkern_importable():
    assert alignkern.__name__ == "alignkern"
