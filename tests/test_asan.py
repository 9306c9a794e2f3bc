"""The AddressSanitizer build is live: a raw ``alignkern._C`` call given an output buffer one element
too short must die with a heap-buffer-overflow report. Runs only under .ci/asan, which builds the
extension with ALIGNKERN_SANITIZE=address and sets ALIGNKERN_ASAN=1; skipped everywhere else. On a
build without the sanitizer the short buffer goes unnoticed and the overflow test fails."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    os.environ.get("ALIGNKERN_ASAN") != "1", reason="AddressSanitizer build only (bash .ci/asan)"
)

# token_logprobs_fwd_cpu(logits, dtype, n_rows, vocab, row_offsets, targets, k, out, row_max,
# log_sum, temperature, ignore_index) writes n_rows * k float32 values to `out` (dtype 0 =
# float32).
_FORWARD = """
import sys
import torch
from alignkern import _C

n_rows, vocab, k, short = 1, 64, 4, {short}
logits = torch.randn(n_rows, vocab)
row_offsets = torch.arange(n_rows, dtype=torch.int64) * vocab
targets = torch.zeros(n_rows, k, dtype=torch.int64)
out = torch.empty(n_rows * k - short)  # its own heap allocation, `short` elements too few
row_max, log_sum = torch.empty(n_rows), torch.empty(n_rows)
print("module:", _C.__file__, file=sys.stderr, flush=True)
_C.token_logprobs_fwd_cpu(logits.data_ptr(), 0, n_rows, vocab, row_offsets.data_ptr(),
                          targets.data_ptr(), k, out.data_ptr(), row_max.data_ptr(),
                          log_sum.data_ptr(), 1.0, -100)
print("returned", flush=True)
"""


def _run_forward(short: int) -> subprocess.CompletedProcess:
    # The child inherits LD_PRELOAD/ASAN_OPTIONS and, run from ROOT, imports the same alignkern.
    return subprocess.run(
        [sys.executable, "-c", _FORWARD.format(short=short)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )


def test_tests_run_against_the_sanitized_copy():
    from alignkern import _C

    assert pathlib.Path(_C.__file__).resolve().is_relative_to(ROOT), _C.__file__
    maps = pathlib.Path("/proc/self/maps").read_text()
    assert "libasan" in maps, "the ASan runtime is not loaded"


def test_correct_buffer_runs_clean():
    result = _run_forward(short=0)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "returned" in result.stdout
    assert "AddressSanitizer" not in result.stderr


def test_short_output_buffer_is_caught():
    result = _run_forward(short=1)
    report = result.stderr
    assert result.returncode != 0 and "returned" not in result.stdout, (
        "the write past the end of `out` went unnoticed: alignkern._C is not built with "
        f"AddressSanitizer\nstdout: {result.stdout}\nstderr: {report[-4000:]}"
    )
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in report, report[-4000:]
    assert "WRITE of size 4" in report, report[-4000:]
    # The faulting frame is the kernel (symbolised, or at least inside the extension module).
    frame0 = next(line for line in report.splitlines() if line.strip().startswith("#0 "))
    assert "token_logprobs" in frame0 or "alignkern/_C" in frame0, report[-4000:]
