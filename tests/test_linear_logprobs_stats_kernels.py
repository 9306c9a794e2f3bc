"""The kernels behind linear_logprobs' fused statistics, called directly (not through the op).

Triton (on CPU tensors under the interpreter here): ``linear_logprobs_fwd`` with statistics against
float64 torch on the materialised logits, split by split (the log-sum-exp's ``row_max`` and
``log_sum``, entropy's ``mean_dz``, ``log_sum_sq``, ``sum_z``, ``max_z`` and the first-maximum
``argmax``), and ``linear_logprobs_dlogits`` with and without the entropy gradient. CUDA
(``TestCudaStats``, skipped without a GPU): ``linear_logprobs_lse_cuda`` with its five statistic
buffers against float64 torch.

Under the interpreter the vocabulary tile is min(1024, next_pow2(V)) columns, so V = 1500 walks
two tiles; V = 50 one masked tile. (With a GPU the Triton tests run there, on whatever vocabulary
splits the launcher picks.)"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE, HAS_GPU

from alignkern.triton_kernels import linear_logprobs as kernels

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = frozenset(kernels.STATS)
FIELDS = ("mean_dz", "log_sum_sq", "sum_z", "max_z", "argmax")
WANTS = {"mean_dz": "entropy", "log_sum_sq": "log_sum_sq_probs", "sum_z": "mean_logits",
         "max_z": "is_top1", "argmax": "is_top1"}


def _inputs(n, vocab, hidden, dtype, bias, scale=3.0, device=DEVICE):
    h = torch.randn(n, hidden, dtype=torch.float64)
    w = torch.randn(vocab, hidden, dtype=torch.float64) * scale / hidden**0.5
    b = torch.randn(vocab, dtype=torch.float64) if bias else None
    return tuple(None if x is None else x.to(dtype).to(device) for x in (h, w, b))


def _kernel_scalars(temperature, softcap, logit_scale):
    """(temperature, softcap, logit_scale) as the op passes them: without a softcap the scale is
    folded into the temperature."""
    if softcap is None:
        return temperature / logit_scale, None, 1.0
    return temperature, softcap, logit_scale


def _logits64(h, w, b, temperature, softcap, logit_scale):
    """float64 z on the CPU."""
    x = h.double().cpu() @ w.double().cpu().T
    if b is not None:
        x = x + b.double().cpu()
    x = x * logit_scale
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    return x / temperature


def _expected(z):
    """The statistics of z (rows x columns) in float64, the log-sum-exp and the mean as the kernels
    keep them: relative to the row maximum."""
    row_max = z.max(1).values
    q = torch.softmax(z, 1)
    return dict(row_max=row_max, log_sum=torch.logsumexp(z - row_max[:, None], 1),
                lse=torch.logsumexp(z, 1), mean_dz=(q * (z - row_max[:, None])).sum(1),
                log_sum_sq=(q * q).sum(1).log(), sum_z=z.sum(1), max_z=row_max,
                argmax=z.argmax(1))


def _split_bounds(vocab, splits):
    """The launcher's vocabulary splits: whole multiples of 256 columns."""
    size = math.ceil(math.ceil(vocab / splits) / 256) * 256
    return [(start, min(start + size, vocab)) for start in range(0, vocab, size)]


def _cpu(got: kernels.SplitStats) -> kernels.SplitStats:
    return kernels.SplitStats(*(None if t is None else t.cpu() for t in got))


def _check_split(got: kernels.SplitStats, j, z, start, tol, stats):
    """Split j (columns [start, z.shape[1])) of ``got`` (on the CPU) against float64."""
    want = _expected(z[:, start:])
    torch.testing.assert_close(got.row_max[j].double(), want["row_max"], rtol=tol, atol=tol)
    torch.testing.assert_close(got.log_sum[j].double(), want["log_sum"], rtol=tol, atol=tol)
    for field in FIELDS:
        value = getattr(got, field)
        if WANTS[field] not in stats:
            assert value is None, field
            continue
        assert value.shape == got.log_sum.shape
        if field == "argmax":
            assert value.dtype == torch.int64
            idx = value[j] - start  # a global id
            assert ((idx >= 0) & (idx < z.shape[1] - start)).all()
            # The same id as float64 wherever the top two are not within rounding of each other.
            top2 = z[:, start:].topk(min(2, z.shape[1] - start), 1).values
            clear = (top2[:, 0] - top2[:, -1]) > 1e-4 * top2[:, 0].abs().clamp(min=1)
            assert torch.equal(idx[clear], want["argmax"][clear])
            picked = z[:, start:].gather(1, idx[:, None])[:, 0]
            torch.testing.assert_close(picked, want["max_z"], rtol=tol, atol=tol)
            continue
        assert value.dtype == got.log_sum.dtype
        atol = tol * (z[:, start:].abs().sum(1).max().item() if field == "sum_z" else 1.0)
        torch.testing.assert_close(value[j].double(), want[field], rtol=tol, atol=atol,
                                   msg=lambda m, f=field: f"{f}: {m}")


def _check_splits(got: kernels.SplitStats, z, tol, stats):
    """Every split of ``got`` against float64 (the launcher's split bounds)."""
    got = _cpu(got)
    bounds = _split_bounds(z.shape[1], got.log_sum.shape[0])
    assert len(bounds) == got.log_sum.shape[0]
    for j, (start, end) in enumerate(bounds):
        _check_split(got, j, z[:, :end], start, tol, stats)


def _merged_argmax(got: kernels.SplitStats):
    """The row's first maximum over the splits: the first split with the largest max_z."""
    max_z, argmax = got.max_z.cpu(), got.argmax.cpu()
    first = torch.zeros(max_z.shape[1], dtype=torch.long)
    for j in range(1, max_z.shape[0]):
        better = max_z[j] > max_z.gather(0, first[None])[0]
        first = torch.where(better, torch.full_like(first, j), first)
    return argmax.gather(0, first[None])[0]


def _run_stats(h, w, b, temperature, softcap, logit_scale, stats):
    t, cap, scale = _kernel_scalars(temperature, softcap, logit_scale)
    return kernels.linear_logprobs_fwd(h, w, b, t, cap, scale, frozenset(stats))


# ----------------------------------------------------------------------------- forward


# float64 cases use a temperature and scale whose 1 / T (T / s folded) float32 holds exactly:
# Triton passes float scalars as float32.
CASES = [
    # n, vocab, hidden, dtype, bias, softcap, temperature, logit_scale, stats
    (5, 50, 7, torch.float32, False, None, 1.0, 1.0, ALL),
    (37, 1500, 33, torch.float32, True, 5.0, 0.7, 1.3, ALL),
    (9, 1500, 19, torch.float64, True, None, 0.5, 2.0, ALL),
    (13, 50, 9, torch.float64, False, 4.0, 0.5, 2.0, {"entropy"}),
    (17, 1029, 11, torch.float32, False, None, 0.9, 1.5, {"log_sum_sq_probs"}),
    (6, 50, 5, torch.float32, True, 3.0, 1.2, 0.8, {"mean_logits"}),
    (21, 1500, 15, torch.float32, False, None, 0.5, 1.0, {"is_top1"}),
    (11, 1100, 17, torch.float64, True, 30.0, 1.0, 1.25, {"entropy", "is_top1"}),
    (8, 300, 13, torch.float32, True, None, 1.1, 0.9, {"log_sum_sq_probs", "mean_logits"}),
    (7, 1500, 9, torch.float32, False, 2.0, 0.6, 1.0,
     {"entropy", "log_sum_sq_probs", "mean_logits"}),
]


@pytest.mark.parametrize("n, vocab, hidden, dtype, bias, softcap, temperature, logit_scale, stats",
                         CASES)
def test_stats_match_float64(n, vocab, hidden, dtype, bias, softcap, temperature, logit_scale,
                             stats):
    h, w, b = _inputs(n, vocab, hidden, dtype, bias)
    got = _run_stats(h, w, b, temperature, softcap, logit_scale, stats)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for part in (got.row_max, got.log_sum):
        assert part.shape[1] == n and part.dtype == acc and part.device == h.device
    z = _logits64(h, w, b, temperature, softcap, logit_scale)
    _check_splits(got, z, 1e-12 if dtype == torch.float64 else 2e-5, stats)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_no_stats_is_the_plain_lse(softcap):
    h, w, b = _inputs(19, 1500, 21, torch.float32, True)
    t, cap, scale = _kernel_scalars(0.8, softcap, 1.4)
    plain = kernels.linear_logprobs_fwd(h, w, b, t, cap, scale, frozenset())
    assert all(getattr(plain, f) is None for f in FIELDS)
    # The LSE does not change when statistics are computed beside it.
    with_stats = kernels.linear_logprobs_fwd(h, w, b, t, cap, scale, ALL)
    assert torch.equal(with_stats.row_max, plain.row_max)
    assert torch.equal(with_stats.log_sum, plain.log_sum)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    h, w, b = _inputs(10, 1500, 24, dtype, True)
    got = _run_stats(h, w, b, 0.9, 10.0, 1.2, ALL)
    assert got.row_max.dtype == got.log_sum.dtype == torch.float32
    # float64 from the rounded inputs: what remains is float32 accumulation.
    _check_splits(got, _logits64(h, w, b, 0.9, 10.0, 1.2), 1e-4, ALL)


def _tied_inputs(dtype, ties, n_extra_rows=1, vocab=1500, hidden=19, device=DEVICE):
    """Dyadic inputs (every dot product exact in any order) where row r's maximum is attained at
    exactly the columns ties[r] (equal weight rows and biases there; no column in two rows'
    ties), and n_extra_rows rows without a planted maximum."""
    assert len({c for cols in ties for c in cols}) == sum(len(cols) for cols in ties)
    g = torch.Generator().manual_seed(1)
    n = len(ties) + n_extra_rows
    signs = torch.tensor([-2.0, -1.0, 1.0, 2.0], dtype=torch.float64)
    h = signs[torch.randint(0, 4, (n, hidden), generator=g)] / 4
    w = torch.randint(-2, 3, (vocab, hidden), generator=g).double() / 8
    b = torch.randint(-2, 3, (vocab,), generator=g).double() / 8
    for r, cols in enumerate(ties):
        # 4 sign(h) dots to 4 sum |h| > 2 sum |h| + |bias| of any other column.
        for c in cols:
            w[c] = 4 * torch.sign(h[r]) / 8
            b[c] = 0.0
    return h.to(dtype).to(device), w.to(dtype).to(device), b.to(dtype).to(device)


# (same tile), (two tiles), (three columns, two tiles, the last column), (second tile only)
TIES = [(3, 10), (100, 1100), (5, 700, 1499), (1030, 1200)]


@pytest.mark.parametrize("dtype, softcap", [(torch.float32, None), (torch.float64, 6.0),
                                            (torch.float32, 6.0)])
def test_argmax_is_the_first_maximum(dtype, softcap):
    h, w, b = _tied_inputs(dtype, TIES)
    got = _run_stats(h, w, b, 0.7, softcap, 1.1, {"is_top1"})
    z = _logits64(h, w, b, 0.7, softcap, 1.1)
    argmax = _merged_argmax(got)
    for r, cols in enumerate(TIES):
        assert torch.equal(z[r, list(cols)], z[r, cols[0]].expand(len(cols)))  # exact ties
        assert argmax[r].item() == cols[0]
    assert torch.equal(argmax, z.argmax(1))
    torch.testing.assert_close(got.max_z.cpu().double().max(0).values, z.max(1).values,
                               rtol=1e-6, atol=1e-6)


def test_vocabulary_splits(monkeypatch):
    """Three splits of 512 columns (the interpreter's 1024-column tile is masked to each split):
    each split's statistics are its own, argmax a global id; merged they give the whole row."""
    monkeypatch.setattr(kernels, "_vocab_splits", lambda *args: 3)
    # Ties inside split 0, across splits 0 and 2, and inside split 1 (split 1 wins for its row
    # only when its own maximum is larger: per split the first maximum within the split).
    ties = [(3, 10), (100, 1100), (600, 900)]
    h, w, b = _tied_inputs(torch.float32, ties, n_extra_rows=4)
    got = _cpu(_run_stats(h, w, b, 0.9, 8.0, 1.0, ALL))
    z = _logits64(h, w, b, 0.9, 8.0, 1.0)
    bounds = _split_bounds(1500, 3)
    assert got.log_sum.shape == (3, h.shape[0]) and bounds[-1] == (1024, 1500)
    for j, (start, end) in enumerate(bounds):
        _check_split(got, j, z[:, :end], start, 2e-5, ALL)
    # Merging the splits (what the op does) gives the whole-vocabulary statistics.
    split_lse = got.row_max.double() + got.log_sum.double()
    lse = torch.logsumexp(split_lse, 0)
    weight = (split_lse - lse).exp()
    want = _expected(z)
    torch.testing.assert_close(lse, want["lse"], rtol=2e-5, atol=2e-5)
    mean_z = (weight * (got.row_max.double() + got.mean_dz.double())).sum(0)
    torch.testing.assert_close(mean_z, want["mean_dz"] + want["row_max"], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(torch.logsumexp(2 * (split_lse - lse) + got.log_sum_sq, 0),
                               want["log_sum_sq"], rtol=2e-5, atol=2e-5)
    argmax = _merged_argmax(got)
    assert torch.equal(argmax, want["argmax"])
    assert argmax[:3].tolist() == [3, 100, 600]


def test_nan_row_leaves_the_others_alone():
    h, w, b = _inputs(9, 1500, 13, torch.float32, True)
    h[4, 2] = math.nan
    got = _cpu(_run_stats(h, w, b, 1.0, None, 1.0, ALL))
    ok = torch.arange(9) != 4
    z = _logits64(h.cpu()[ok], w, b, 1.0, None, 1.0)
    _check_splits(kernels.SplitStats(*(t[:, ok] for t in got)), z, 2e-5, ALL)
    assert ((got.argmax[:, 4] >= 0) & (got.argmax[:, 4] < 1500)).all()


def test_empty_rows_and_unknown_statistics():
    h, w, _ = _inputs(0, 50, 5, torch.float32, False)
    got = kernels.linear_logprobs_fwd(h, w, None, 1.0, None, 1.0, ALL)
    assert got.log_sum.shape[1] == 0 and got.argmax.shape == got.log_sum.shape
    with pytest.raises(ValueError, match="unknown statistics"):
        kernels.linear_logprobs_fwd(h, w, None, 1.0, None, 1.0, frozenset({"entropy2"}))


# ----------------------------------------------------------------------------- dlogits


def _dense64(z, row_max, log_sum, coef, entropy_grad, temperature, softcap, logit_scale, capped):
    """The kernel's formula in float64 (kernel scalars: logit_scale folded when no softcap)."""
    dz = z - row_max[:, None]
    factor = coef[:, None] if entropy_grad is None else coef[:, None] + entropy_grad[:, None] * dz
    grad = -factor * (dz - log_sum[:, None]).exp() / temperature * logit_scale
    if softcap is not None:
        grad = grad * (1 - (capped / softcap) ** 2)
    return grad


@pytest.mark.parametrize("n, vocab, hidden, dtype, bias, softcap, with_entropy", [
    (5, 50, 7, torch.float32, False, None, False),
    (5, 50, 7, torch.float32, False, None, True),
    (23, 1500, 13, torch.float32, True, 5.0, True),
    (9, 1100, 11, torch.float64, True, None, True),
    (9, 1100, 11, torch.float64, False, 3.0, False),
])
def test_dlogits(n, vocab, hidden, dtype, bias, softcap, with_entropy):
    h, w, b = _inputs(n, vocab, hidden, dtype, bias)
    # 1 / T exact in float32 (with or without the scale folded in)
    t, cap, scale = _kernel_scalars(0.5, softcap, 1.25)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    z = _logits64(h, w, b, 0.5, softcap, 1.25)
    row_max = z.max(1).values
    log_sum = torch.logsumexp(z - row_max[:, None], 1)
    coef = torch.randn(n, dtype=torch.float64)
    entropy_grad = torch.randn(n, dtype=torch.float64) if with_entropy else None

    def acc_(x):
        return x.to(acc).to(h.device)

    out = torch.full((n, vocab), math.nan, dtype=dtype, device=h.device)
    kernels.linear_logprobs_dlogits(h, w, b, acc_(coef), acc_(row_max), acc_(log_sum), out, t,
                                    cap, scale,
                                    None if entropy_grad is None else acc_(entropy_grad))
    capped = z * 0.5 if softcap is not None else None
    want = _dense64(z, row_max, log_sum, coef, entropy_grad, t, cap, scale, capped)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.cpu().double(), want, rtol=tol,
                               atol=tol * want.abs().max().item())
    if not with_entropy:
        return
    # entropy_grad = 0 is the plain kernel's answer.
    plain = torch.empty_like(out)
    kernels.linear_logprobs_dlogits(h, w, b, acc_(coef), acc_(row_max), acc_(log_sum), plain, t,
                                    cap, scale)
    zero = torch.empty_like(out)
    kernels.linear_logprobs_dlogits(h, w, b, acc_(coef), acc_(row_max), acc_(log_sum), zero, t,
                                    cap, scale, acc_(torch.zeros(n)))
    torch.testing.assert_close(zero, plain, rtol=1e-6, atol=0)


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_dlogits_entropy_gradient_matches_autograd(softcap):
    """With coef = g (H - log_sum) and entropy_grad = g, the dense part is d(sum g H)/d logits:
    what the op builds on."""
    n, vocab = 7, 1500
    h, w, b = _inputs(n, vocab, 9, torch.float64, True, device="cpu")
    logits = (h @ w.T + b).requires_grad_(True)
    scale, temperature = 1.25, 0.5  # 1 / T exact in float32, as Triton passes it
    x = logits * scale
    capped = x if softcap is None else softcap * torch.tanh(x / softcap)
    z = capped / temperature
    p = torch.softmax(z, 1)
    entropy = -(p * torch.log_softmax(z, 1)).sum(1)
    g = torch.randn(n, dtype=torch.float64)
    (want,) = torch.autograd.grad((g * entropy).sum(), logits)
    row_max = z.detach().max(1).values
    log_sum = torch.logsumexp(z.detach() - row_max[:, None], 1)
    coef = g * (entropy.detach() - log_sum)
    h, w, b, coef, row_max, log_sum, g = (x.to(DEVICE) for x in (h, w, b, coef, row_max, log_sum,
                                                                 g))
    out = torch.empty(n, vocab, dtype=torch.float64, device=DEVICE)
    t, cap, s = _kernel_scalars(temperature, softcap, scale)
    kernels.linear_logprobs_dlogits(h, w, b, coef, row_max, log_sum, out, t, cap, s, g)
    torch.testing.assert_close(out.cpu(), want, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- CUDA


def _cuda_extension():
    from alignkern import _backend

    try:
        ext = _backend.extension()
    except RuntimeError:
        return None
    return ext if ext.has_cuda() else None


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
class TestCudaStats:
    """linear_logprobs_lse_cuda with its statistic buffers (one LSE per row: the whole vocabulary)
    against float64 torch."""

    @staticmethod
    def _run(h, w, b, temperature, softcap, logit_scale, stats):
        from alignkern import _backend

        ext = _cuda_extension()
        if ext is None:
            pytest.skip("alignkern._C was built without the CUDA kernels")
        n = h.shape[0]
        out = {"row_max": torch.full((n,), math.nan, device="cuda"),
               "log_sum": torch.full((n,), math.nan, device="cuda")}
        for field in FIELDS:
            if WANTS[field] in stats:
                out[field] = (torch.full((n,), -1, dtype=torch.int64, device="cuda")
                              if field == "argmax" else torch.full((n,), math.nan, device="cuda"))
        t, cap, scale = _kernel_scalars(temperature, softcap, logit_scale)
        ext.linear_logprobs_lse_cuda(
            h.data_ptr(), h.stride(0), w.data_ptr(), w.stride(0), 0 if b is None else b.data_ptr(),
            _backend.DTYPE_CODES[h.dtype], n, w.shape[0], w.shape[1], out["row_max"].data_ptr(),
            out["log_sum"].data_ptr(), float(t), 0.0 if cap is None else float(cap), float(scale),
            _backend.cuda_stream(h.device),
            *(out[f].data_ptr() if f in out else 0 for f in FIELDS))
        torch.cuda.synchronize()
        return out

    @staticmethod
    def _check(out, z, tol, stats):
        want = _expected(z)
        for part in ("row_max", "log_sum"):
            torch.testing.assert_close(out[part].double().cpu(), want[part], rtol=tol, atol=tol)
        for field in FIELDS:
            if WANTS[field] not in stats:
                assert field not in out
                continue
            got = out[field].cpu()
            if field == "argmax":
                top2 = z.topk(2, 1).values
                clear = (top2[:, 0] - top2[:, 1]) > 1e-3 * top2[:, 0].abs().clamp(min=1)
                assert torch.equal(got[clear], want["argmax"][clear])
                assert ((got >= 0) & (got < z.shape[1])).all()
                continue
            atol = tol * (z.abs().sum(1).max().item() if field == "sum_z" else 1.0)
            torch.testing.assert_close(got.double(), want[field], rtol=tol, atol=atol,
                                       msg=lambda m, f=field: f"{f}: {m}")

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("bias, softcap", [(False, None), (True, 30.0)])
    @pytest.mark.parametrize("stats", [ALL, {"entropy"}, {"is_top1"},
                                       {"log_sum_sq_probs", "mean_logits"}])
    @pytest.mark.parametrize("aligned", [True, False])
    def test_stats_match_float64(self, dtype, bias, softcap, stats, aligned):
        n, vocab, hidden = 77, 5003, 256 if aligned else 250
        h, w, b = _inputs(n, vocab, hidden, dtype, bias, device="cuda")
        if not aligned:  # rows of an odd stride: the scalar-staging kernel
            h = torch.cat([h, h[:, :1]], 1)[:, :hidden]
        out = self._run(h, w, b, 0.7, softcap, 1.3, stats)
        z = _logits64(h, w, b, 0.7, softcap, 1.3)
        self._check(out, z, 2e-4, stats)

    def test_kbk_64(self, monkeypatch):
        monkeypatch.setenv("ALIGNKERN_CUDA_CONFIG", "linear_kbk=64")
        h, w, b = _inputs(50, 3001, 128, torch.bfloat16, True, device="cuda")
        out = self._run(h, w, b, 1.0, None, 1.0, ALL)
        self._check(out, _logits64(h, w, b, 1.0, None, 1.0), 2e-4, ALL)

    def test_no_stats_is_the_plain_lse(self):
        h, w, b = _inputs(33, 2000, 64, torch.bfloat16, True, device="cuda")
        plain = self._run(h, w, b, 0.9, 20.0, 1.1, frozenset())
        with_stats = self._run(h, w, b, 0.9, 20.0, 1.1, ALL)
        assert list(plain) == ["row_max", "log_sum"]
        for part in ("row_max", "log_sum"):
            torch.testing.assert_close(plain[part], with_stats[part], rtol=1e-6, atol=1e-6)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_argmax_is_the_first_maximum(self, dtype):
        # Kernel tiles are 64 columns, split between two threads by parity: ties in one thread,
        # across the two threads, across tiles (same thread), three at once up to the last
        # column, across the threads of a later tile.
        ties = [(3, 5), (8, 9), (10, 700), (15, 130, 1499), (1030, 1031)]
        h, w, b = _tied_inputs(dtype, ties, n_extra_rows=3, device="cuda")
        out = self._run(h, w, b, 0.7, None, 1.0, {"is_top1"})
        z = _logits64(h, w, b, 0.7, None, 1.0)
        assert out["argmax"].cpu().tolist()[: len(ties)] == [c[0] for c in ties]
        assert torch.equal(out["argmax"].cpu(), z.argmax(1))
