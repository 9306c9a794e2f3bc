"""Compile alignkern's Triton kernels for sm_80 and sm_90 on a machine without a GPU.

Each case calls a launcher's own planning function (``_fwd_plan``, ...) with meta tensors of one
dtype, one combination of optional inputs (what sets the kernel's constexpr flags) and one shape
class, and gets back what the launcher would launch: the kernel, its arguments, its meta-parameters
and its tuning space (``alignkern/triton_kernels/_tuning.py``). Every configuration of the space is
then compiled through the kernel's own ``warmup`` (so Triton specialises the arguments exactly as
at a launch) under a stand-in driver that reports an sm_80 or sm_90 GPU. Per compile it records
the dynamic shared memory, the registers, stack frame and spill bytes that the bundled ptxas
reports with ``-v``, and the number of wgmma (sm_90) and mma.sync instructions in the PTX.

Results are cached per compile under ``$ALIGNKERN_COMPILE_CACHE`` (default
``~/.cache/alignkern/gpu-compile``), keyed by the kernel's source hash (its callees included), the
argument specialisation, the meta-parameters, the options, the target and the Triton version, so
an unchanged kernel is never compiled twice.

    python tests/gpu_compile.py                  # the tier the CPU test suite runs
    python tests/gpu_compile.py --all            # every case x configuration x arch (CI step)
    python tests/gpu_compile.py --report         # a table per kernel (markdown)
    python tests/gpu_compile.py --json out.json  # the raw records

Tiers. ``core`` (tests/test_gpu_compile.py, a few minutes cold on 2 cores): every configuration
of every tuning space in the heaviest variant (every optional input given) of every dtype, with
aligned and with odd sizes, but for the attention kernels, whose compiles take 5-25 s each and
which ``_in_core`` restricts, and linear_logprobs' fused-statistics variants (odd sizes, no
float16 there). ``all``: the whole product (linear_logprobs' forward with every combination of
its statistics too),
every dtype x flag combination x shape class x configuration (hours on 2 cores; cached).
Run as a script it unsets TRITON_INTERPRET (the interpreter replaces the kernels);
imported (tests/test_gpu_compile.py) it only lists cases and reads results.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # before triton is imported: compile, do not interpret
    os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import pkgutil  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import alignkern.triton_kernels  # noqa: E402
from alignkern.triton_kernels import _tuning  # noqa: E402
from alignkern.triton_kernels import linear_kl as kl_kernels  # noqa: E402
from alignkern.triton_kernels import linear_logprobs as linear_kernels  # noqa: E402
from alignkern.triton_kernels import reward_attention as attention_kernels  # noqa: E402
from alignkern.triton_kernels import token_logprobs as token_kernels  # noqa: E402

ARCHS = (80, 90)
# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SMEM_LIMIT = {80: 166_912, 90: 232_448}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
CACHE_DIR = Path(
    os.environ.get("ALIGNKERN_COMPILE_CACHE", Path.home() / ".cache" / "alignkern" / "gpu-compile")
)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


# ----------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One call of a launcher: ``family`` names the builder below; ``flags`` the optional inputs
    given; ``shape`` is ``aligned`` (sizes multiples of 16, aligned pointers) or ``odd``."""

    family: str
    dtype: str
    flags: tuple
    shape: str

    @property
    def label(self) -> str:
        flags = ",".join(f"{k}={v}" for k, v in self.flags) or "-"
        return f"{self.family} {self.dtype} {flags} {self.shape}"

    @property
    def heavy(self) -> bool:
        """Every optional input given, aligned sizes: the variant with the most live state."""
        return self.shape == "aligned" and all(v not in (False, None, "none") for _, v in self.flags)


def _token_rows(case: Case):
    dtype, acc = DTYPES[case.dtype], _acc(DTYPES[case.dtype])
    if case.shape == "aligned":
        n, vocab, k = 16, 128256, 4
        logits = _meta(n, vocab, dtype=dtype)
    else:  # a shifted view: rows start 1 element in, the vocabulary is odd
        n, vocab, k = 15, 50257, 1
        logits = _meta(n, vocab + 1, dtype=dtype)[:, 1:]
    return logits, _meta(n, dtype=torch.int64), vocab, n, k, acc


def _token_fwd(case: Case):
    logits, offsets, vocab, n, k, acc = _token_rows(case)
    yield token_kernels._fwd_plan(
        logits,
        offsets,
        vocab,
        _meta(n, k, dtype=torch.int64),
        _meta(n, k, dtype=acc),
        _meta(n, dtype=acc),
        _meta(n, dtype=acc),
        0.7,
        -100,
    )


def _token_bwd(case: Case):
    logits, offsets, vocab, n, _, acc = _token_rows(case)
    yield token_kernels._dense_bwd_plan(
        _meta(n, dtype=acc),
        logits,
        offsets,
        vocab,
        _meta(n, dtype=acc),
        _meta(n, dtype=acc),
        _meta(n, vocab, dtype=logits.dtype),
        0.7,
    )


def _linear_inputs(case: Case, ref: bool = False):
    """Hidden states and the LM head; the flag ``head`` gives the head a lower precision than the
    hidden states (TRL's cast_lm_head_to_fp32: float32 hidden states, a bf16 head)."""
    dtype = DTYPES[case.dtype]
    if case.shape == "aligned":
        n, hidden_size, vocab = 256, 4096, 128256
        hidden = _meta(n, hidden_size, dtype=dtype)
    else:  # a row stride that is not a multiple of 16 elements, odd sizes
        n, hidden_size, vocab = 37, 1000, 50257
        hidden = _meta(n, hidden_size + 1, dtype=dtype)[:, :hidden_size]
    weight = _meta(vocab, hidden_size, dtype=DTYPES[dict(case.flags).get("head", case.dtype)])
    return hidden, weight, n, vocab


def _linear_fwd(case: Case):
    hidden, weight, n, vocab = _linear_inputs(case)
    flags = dict(case.flags)
    bias = _meta(vocab, dtype=weight.dtype) if flags["bias"] else None
    softcap = 30.0 if flags["softcap"] else None
    stats = flags.get("stats", "none")
    stats = {"all": frozenset(linear_kernels.STATS), "none": frozenset()}.get(
        stats, frozenset(stats.split("+"))
    )
    plan, _ = linear_kernels._fwd_plan(hidden, weight, bias, 0.7, softcap, 0.5, stats)
    yield plan


def _linear_dlogits(case: Case):
    hidden, weight, n, vocab = _linear_inputs(case)
    flags = dict(case.flags)
    bias = _meta(vocab, dtype=weight.dtype) if flags["bias"] else None
    softcap = 30.0 if flags["softcap"] else None
    acc = _acc(hidden.dtype)
    yield linear_kernels._dlogits_plan(
        hidden,
        weight,
        bias,
        _meta(n, dtype=acc),
        _meta(n, dtype=acc),
        _meta(n, dtype=acc),
        _meta(n, vocab, dtype=hidden.dtype),
        0.7,
        softcap,
        0.5,
        _meta(n, dtype=acc) if flags.get("entropy_grad") else None,
    )


def _kl_inputs(case: Case):
    hidden, weight, n, vocab = _linear_inputs(case)
    ref_size = hidden.shape[1] // 2  # a smaller reference model
    ref_hidden = _meta(n, ref_size, dtype=hidden.dtype)
    ref_weight = _meta(vocab, ref_size, dtype=hidden.dtype)
    return hidden, weight, ref_hidden, ref_weight, n, vocab, _acc(hidden.dtype)


def _kl_fwd(case: Case):
    hidden, weight, ref_hidden, ref_weight, n, _, acc = _kl_inputs(case)
    yield kl_kernels._fwd_plan(
        hidden, weight, ref_hidden, ref_weight, *(_meta(n, dtype=acc) for _ in range(6)), 0.7
    )


def _kl_dlogits(case: Case):
    hidden, weight, ref_hidden, ref_weight, n, vocab, acc = _kl_inputs(case)
    yield kl_kernels._dlogits_plan(
        hidden,
        weight,
        ref_hidden,
        ref_weight,
        _meta(n, dtype=acc),
        _meta(n, dtype=acc),
        _meta(n, dtype=acc),
        _meta(n, dtype=acc),
        _meta(n, vocab, dtype=hidden.dtype),
        0.7,
    )


def _attention_inputs(case: Case):
    dtype = DTYPES[case.dtype]
    acc = _acc(dtype)
    flags = dict(case.flags)
    head_dim = flags["D"]
    if case.shape == "aligned":
        batch, heads_q, heads_kv, len_q, len_k = 2, 4, 4, 512, 512
    else:  # grouped-query attention, odd lengths, Lq != Lk
        batch, heads_q, heads_kv, len_q, len_k = 1, 4, 2, 37, 45
    q = _meta(batch, heads_q, len_q, head_dim, dtype=dtype)
    k = _meta(batch, heads_kv, len_k, head_dim, dtype=dtype)
    v = _meta(batch, heads_kv, len_k, head_dim, dtype=dtype)
    bias = {
        "none": None,
        "shared": _meta(batch, 1, len_k, dtype=acc),
        "per_head": _meta(batch, heads_q, len_k, dtype=acc),
    }[flags["bias"]]
    ranks = (
        (_meta(batch, len_k, dtype=torch.float64), _meta(batch, len_q, dtype=torch.float64))
        if flags["ranks"]
        else (None, None)
    )
    return q, k, v, bias, ranks, flags["causal"], acc


def _attention_fwd(case: Case):
    q, k, v, bias, (key_rank, query_rank), causal, acc = _attention_inputs(case)
    yield attention_kernels._fwd_plan(
        q,
        k,
        v,
        bias,
        key_rank,
        query_rank,
        causal,
        0.125,
        _meta(*q.shape, dtype=q.dtype),
        _meta(*q.shape[:3], dtype=acc),
    )


def _attention_bwd(case: Case):
    q, k, v, bias, (key_rank, query_rank), causal, acc = _attention_inputs(case)
    flags = dict(case.flags)
    dbias = _meta(q.shape[0], q.shape[1], k.shape[2], dtype=acc) if flags["bias_grad"] else None
    yield from attention_kernels._bwd_plans(
        _meta(*q.shape, dtype=q.dtype),
        _meta(*q.shape[:3], dtype=acc),
        q,
        k,
        v,
        bias,
        key_rank,
        query_rank,
        causal,
        0.125,
        _meta(*q.shape[:3], dtype=acc),
        _meta(*q.shape, dtype=q.dtype),
        _meta(*k.shape, dtype=q.dtype),
        _meta(*v.shape, dtype=q.dtype),
        dbias,
    )


BUILDERS = {
    "token_fwd": _token_fwd,
    "token_bwd": _token_bwd,
    "linear_fwd": _linear_fwd,
    "linear_dlogits": _linear_dlogits,
    "kl_fwd": _kl_fwd,
    "kl_dlogits": _kl_dlogits,
    "attention_fwd": _attention_fwd,
    "attention_bwd": _attention_bwd,
}


def _flag_product(**choices):
    names = list(choices)
    for values in itertools.product(*(choices[n] for n in names)):
        yield tuple(zip(names, values))


# Every non-empty proper subset of linear_logprobs' fused statistics (the --all tier compiles each;
# ptxas allocates registers differently for each combination).
_STATS_SUBSETS = tuple(
    "+".join(c)
    for r in range(1, len(linear_kernels.STATS))
    for c in itertools.combinations(linear_kernels.STATS, r)
)


def cases() -> list[Case]:
    """Every (launcher, dtype, optional inputs, shape class) the ops can produce."""
    out = []
    for dtype, shape in itertools.product(DTYPES, ("aligned", "odd")):
        for family in ("token_fwd", "token_bwd", "kl_fwd", "kl_dlogits"):
            out.append(Case(family, dtype, (), shape))
        # stats: every fused statistic of linear_logprobs_fwd_stats, none (the plain LSE), or
        # (bias and softcap given) each other combination, as names joined by "+".
        for flags in _flag_product(bias=(True, False), softcap=(True, False), stats=("all", "none")):
            out.append(Case("linear_fwd", dtype, flags, shape))
        for stats in _STATS_SUBSETS:
            flags = (("bias", True), ("softcap", True), ("stats", stats))
            out.append(Case("linear_fwd", dtype, flags, shape))
        for flags in _flag_product(bias=(True, False), softcap=(True, False), entropy_grad=(True, False)):
            out.append(Case("linear_dlogits", dtype, flags, shape))
        if dtype == "fp32":  # a bf16 head under float32 hidden states, converted tile by tile
            for flags in _flag_product(bias=(True,), softcap=(True,), stats=("all", "none")):
                out.append(Case("linear_fwd", dtype, flags + (("head", "bf16"),), shape))
            for flags in _flag_product(bias=(True,), softcap=(True,), entropy_grad=(True, False)):
                out.append(Case("linear_dlogits", dtype, flags + (("head", "bf16"),), shape))
        # D = 16, 32, 64, 128, 256 are the BLOCK_D variants; odd shapes pad 80 and 200.
        dims = (16, 32, 64, 128, 256) if shape == "aligned" else (80, 200)
        for flags in _flag_product(
            D=dims, bias=("per_head", "shared", "none"), ranks=(True, False), causal=(True, False)
        ):
            out.append(Case("attention_fwd", dtype, flags, shape))
            for bias_grad in (True, False) if dict(flags)["bias"] != "none" else (False,):
                out.append(Case("attention_bwd", dtype, flags + (("bias_grad", bias_grad),), shape))
    return out


# ----------------------------------------------------------------------------- jobs


@dataclasses.dataclass(frozen=True)
class Job:
    case: Case
    plan: int  # index into the case's plans
    config: int  # index into the plan's tuning space
    arch: int


def _plans(case: Case) -> list:
    return [p for p in BUILDERS[case.family](case) if p is not None]


def _lightest(case: Case) -> bool:
    """Every optional input left out."""
    return all(v in (False, None, "none") or k == "D" for k, v in case.flags)


def _all_inputs(case: Case) -> bool:
    """Every optional input given."""
    return all(v not in (False, None, "none") for _, v in case.flags)


def _shared_prefix_part(case: Case) -> bool:
    """What shared_prefix_attention's prefix part runs at a decode or scoring step of a
    SharedPrefixCache: bfloat16, not causal, a key bias shared by the heads (padding, rewards),
    no ranks, D = 128; its suffix part is the heaviest variant's causal kernel."""
    flags = dict(case.flags)
    return (case.family.startswith("attention") and case.dtype == "bf16"
            and case.shape == "aligned" and flags.get("D") == 128 and not flags["causal"]
            and flags["bias"] == "shared" and not flags["ranks"]
            and not flags.get("bias_grad", False))


def _in_core(case: Case, plan, config: int, arch: int) -> bool:
    """The core tier (what the CPU suite compiles, about 2-3 minutes cold on 2 cores):

    - token_logprobs, linear_logprobs, linear_kl (about a second a compile): every configuration
      of every space, every dtype, every optional input given, aligned and odd sizes (masked
      edges and unaligned rows need more registers for the addresses; float16 and bfloat16
      allocate registers differently); linear_logprobs also with its fused statistics (forward:
      every statistic; dlogits: the entropy gradient), bias and softcap given, odd sizes, every
      dtype but float16 (whose register counts match bfloat16's for these);
    - reward_attention (5-25 s a compile): every configuration in the heaviest bfloat16 variant
      (every optional input given, aligned) at the benchmark head dimensions 64 and 128; the
      default configuration of the lightest bfloat16 variant with odd sizes (D = 80, padded to
      128); float32 and float64 at D = 64 on sm_80 only (their FMA/DMMA code is the same on both,
      sm_80 has the smaller shared memory); the default configuration of the variant that
      shared_prefix_attention's prefix part runs (``_shared_prefix_part``).

    ``--all`` adds the rest of the product: the lighter flag combinations, float16 attention and
    attention at D = 16, 32, 256 and 200."""
    flags = dict(case.flags)
    head_dim = flags.get("D")
    attention = case.family.startswith("attention")
    if case.family in ("linear_fwd", "linear_dlogits"):
        # The fused-statistics variants with odd sizes only (they need more registers than
        # aligned ones in every configuration); --all adds the aligned ones.
        stats = flags.get("stats", "none")
        if stats not in ("all", "none"):
            return False
        # float16 allocates registers as bfloat16 does here (the same counts in every
        # configuration), so these variants skip it in the core tier.
        fused = stats == "all" or flags.get("entropy_grad")
        if fused and (case.shape != "odd" or case.dtype == "fp16"):
            return False
        return flags["bias"] and flags["softcap"]
    if not attention:
        return _all_inputs(case)
    if case.dtype == "bf16" and case.heavy:
        return head_dim in (64, 128)
    if _shared_prefix_part(case):
        return config == 0
    if case.dtype in ("fp32", "fp64") and case.heavy:
        return head_dim == 64 and arch == 80
    if config != 0:
        return False
    return case.dtype == "bf16" and attention and case.shape == "odd" and _lightest(case) and head_dim == 80


def jobs(tier: str, pattern: str | None = None) -> list[Job]:
    """The compiles of ``tier``, less those whose ``kernel case`` label does not match
    ``pattern``, one per compile key (identical specialisations are compiled once)."""
    out, seen = [], set()
    for case in cases():
        for p, plan in enumerate(_plans(case)):
            if pattern and not re.search(pattern, f"{plan.name} {case.label}"):
                continue
            for c, cfg in enumerate(plan.configs):
                for arch in ARCHS:
                    if tier != "all" and not _in_core(case, plan, c, arch):
                        continue
                    key = _job_key(plan, cfg, arch)
                    if key not in seen:
                        seen.add(key)
                        out.append(Job(case, p, c, arch))
    return out


def kernels_found() -> list[str]:
    """Every @triton.jit kernel (``*_kernel``) in alignkern/triton_kernels/."""
    names = set()
    for info in pkgutil.iter_modules(alignkern.triton_kernels.__path__):
        module = importlib.import_module(f"alignkern.triton_kernels.{info.name}")
        for name, obj in vars(module).items():
            # (An InterpretedFunction when imported under TRITON_INTERPRET, as in the test suite.)
            jitted = isinstance(obj, JITFunction) or type(obj).__name__ == "InterpretedFunction"
            if jitted and name.endswith("_kernel"):
                names.add(name)
    return sorted(names)


# ----------------------------------------------------------------------------- compiling


class _StandInDriver:
    """What JITFunction.warmup asks of a driver, for a GPU of compute capability ``arch``. The
    device id is the arch, so each arch keeps its own in-process kernel cache."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


def _arg_spec(arg) -> str:
    """How Triton specialises an argument: dtype and 16-byte alignment of pointers, width,
    divisibility by 16 and == 1 of integers."""
    if isinstance(arg, torch.Tensor):
        return f"*{arg.dtype}{'/16' if arg.data_ptr() % 16 == 0 else ''}"
    if isinstance(arg, bool):
        return f"b{int(arg)}"
    if isinstance(arg, int):
        if arg == 1:
            return "1"
        width = "i32" if -(2**31) <= arg < 2**31 else "i64"
        return f"{width}{'/16' if arg % 16 == 0 else ''}"
    if isinstance(arg, float):
        return "f"
    return repr(arg)


def _job_key(plan, cfg, arch: int) -> str:
    parts = [
        RECORD_VERSION,
        triton.__version__,
        plan.kernel.cache_key,
        arch,
        [_arg_spec(a) for a in plan.args],
        sorted((k, repr(v)) for k, v in plan.constexprs.items()),
        sorted((k, repr(v)) for k, v in cfg.all_kwargs().items()),
        sorted((k, repr(v)) for k, v in plan.options.items()),
        os.environ.get("TRITON_DEFAULT_FP_FUSION", ""),
    ]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


# Bumped when a record's fields or their meaning change (old cached records are then ignored).
# 3: a failed compile's error ends with the exception that caused it.
RECORD_VERSION = 3
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def _triton_ptxas_flags() -> list[str]:
    """The register-allocation flag Triton's own ptxas call adds (Triton 3.5+ passes
    --regAllocOptLevel=2, which changes the register count and the spills)."""
    import inspect

    from triton.backends.nvidia import compiler as nvidia

    try:
        source = inspect.getsource(nvidia.CUDABackend.make_cubin)
    except (OSError, TypeError, AttributeError):
        return []
    found = re.search(r"--regAllocOptLevel=\d+", source)
    return [found.group(0)] if found else []


def _ptxas_log(kernel, arch: int, plan) -> str:
    """ptxas -v on the kernel's PTX, with the flags Triton passes (for when Triton's own log was
    not printed: its on-disk cache answered)."""
    from triton.backends.nvidia import compiler as nvidia

    ptxas = nvidia.get_ptxas(arch).path
    gpu = nvidia.sm_arch_from_capability(arch)
    fmad = [] if kernel.metadata.enable_fp_fusion else ["--fmad=false"]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(kernel.asm["ptx"])
        done = subprocess.run(
            [
                ptxas,
                "-lineinfo",
                *fmad,
                "-v",
                *_triton_ptxas_flags(),
                f"--gpu-name={gpu}",
                str(src),
                "-o",
                str(Path(tmp) / "k.cubin"),
            ],
            capture_output=True,
            text=True,
        )
    return done.stdout + done.stderr


def _error_text(exc: BaseException) -> str:
    """The error, its last line the reason: Triton's CompilationError names the kernel's source
    line; the exception that caused it (often a bare ``assert`` in triton.language) says why, so
    it ends the text with the assertion's own source line."""
    text = f"{type(exc).__name__}: {exc}"[-1500:]
    root, seen = exc, {id(exc)}
    while (root.__cause__ or root.__context__) is not None:
        root = root.__cause__ or root.__context__
        if id(root) in seen:
            break
        seen.add(id(root))
    if root is not exc:
        where = traceback.extract_tb(root.__traceback__)
        line = f" ({where[-1].filename}:{where[-1].lineno}: {where[-1].line})" if where else ""
        message = (str(root).strip().splitlines() or [""])[0][:300]
        text += f"\ncaused by {type(root).__name__}: {message}{line}"
    return text


def compile_job(job: Job) -> dict:
    plan = _plans(job.case)[job.plan]
    cfg = plan.configs[job.config]
    record = dict(
        kernel=plan.name,
        case=job.case.label,
        family=job.case.family,
        dtype=job.case.dtype,
        flags=dict(job.case.flags),
        shape=job.case.shape,
        constexprs={k: v for k, v in plan.constexprs.items()},
        config=_tuning.config_label(cfg),
        config_index=job.config,
        n_configs=len(plan.configs),
        arch=job.arch,
        key=_job_key(plan, cfg, job.arch),
    )
    cached = CACHE_DIR / f"{record['key']}.json"
    if cached.exists():
        try:
            return {**record, **json.loads(cached.read_text()), "cached": True}
        except ValueError:
            pass
    from triton import knobs

    knobs.nvidia.dump_ptxas_log = True
    driver.set_active(_StandInDriver(job.arch))
    started = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            kernel = plan.kernel.warmup(
                *plan.args, grid=(1,), **plan.constexprs, **cfg.all_kwargs(), **plan.options
            )
    except Exception as exc:  # a compile error is a result, not a crash
        result = dict(ok=False, error=_error_text(exc))
    else:
        ptxas = log.getvalue()
        if not _PTXAS_REGS.search(ptxas):
            ptxas = _ptxas_log(kernel, job.arch, plan)
        # Every function in the log (the kernel; a noinline callee would add its own frame).
        frames = [tuple(map(int, f)) for f in _PTXAS_FRAME.findall(ptxas)]
        regs = [int(r) for r in _PTXAS_REGS.findall(ptxas)]
        ptx = kernel.asm["ptx"]
        result = dict(
            ok=True,
            shared=int(kernel.metadata.shared),
            regs=max(regs) if regs else None,
            stack=max(f[0] for f in frames) if frames else None,
            spill_stores=sum(f[1] for f in frames) if frames else None,
            spill_loads=sum(f[2] for f in frames) if frames else None,
            wgmma=len(re.findall(r"^\s*wgmma\.mma_async", ptx, re.M)),
            mma=len(re.findall(r"^\s*mma\.sync", ptx, re.M)),
        )
    result["seconds"] = round(time.perf_counter() - started, 3)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, cached)
    return {**record, **result, "cached": False}


def run(
    tier: str = "core", workers: int | None = None, progress: bool = False, pattern: str | None = None
) -> dict:
    todo = jobs(tier, pattern)
    workers = workers or os.cpu_count() or 1
    started = time.perf_counter()
    records = []
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        for i, record in enumerate(pool.map(compile_job, todo, chunksize=1)):
            records.append(record)
            if progress:
                sys.stderr.write(f"\r{i + 1}/{len(todo)} {record['kernel'][:40]:<40}")
    if progress:
        sys.stderr.write("\n")
    return dict(
        tier=tier,
        triton=triton.__version__,
        torch=torch.__version__,
        seconds=round(time.perf_counter() - started, 1),
        workers=workers,
        compiled=sum(not r["cached"] for r in records),
        kernels=kernels_found(),
        smem_limit={str(a): v for a, v in SMEM_LIMIT.items()},
        records=records,
    )


# ----------------------------------------------------------------------------- CUDA (csrc/cuda)


def cuobjdump() -> str | None:
    """The cuobjdump of the CUDA toolkit, else the one in the triton wheel."""
    import shutil

    from triton.backends.nvidia import compiler as nvidia

    for candidate in (
        shutil.which("cuobjdump"),
        "/usr/local/cuda/bin/cuobjdump",
        str(Path(nvidia.__file__).parent / "bin" / "cuobjdump"),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


_RES_FUNCTION = re.compile(r"^\s*Function (\S+):\s*$")
_RES_FIELDS = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")


def cuda_resources(module: str | Path) -> list[dict]:
    """Registers, stack, static shared and local memory of every kernel in the cubins of
    ``module`` (``cuobjdump -res-usage``), one record per kernel and architecture. Demangled
    names come from ``c++filt`` when it is installed."""
    import shutil

    text = subprocess.run(
        [cuobjdump(), "-res-usage", str(module)], capture_output=True, text=True, check=True
    ).stdout
    records, arch = [], None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        found = re.match(r"^\s*arch = sm_(\d+)", line)
        if found:
            arch = int(found.group(1))
            continue
        found = _RES_FUNCTION.match(line)
        if found and i + 1 < len(lines):
            fields = {k.lower(): int(v) for k, v in _RES_FIELDS.findall(lines[i + 1])}
            records.append(dict(kernel=found.group(1), arch=arch, **fields))
    if records and shutil.which("c++filt"):
        names = subprocess.run(
            ["c++filt"], input="\n".join(r["kernel"] for r in records), capture_output=True, text=True
        ).stdout.splitlines()
        if len(names) == len(records):
            for record, name in zip(records, names):
                record["name"] = name
    return records


def cuda_problems(records: list[dict]) -> list[str]:
    """A kernel with a stack frame (spilled registers live there) or local memory."""
    return [
        f"{r.get('name', r['kernel'])} sm_{r['arch']}: stack {r.get('stack')} B, local {r.get('local')} B"
        for r in records
        if r.get("stack") or r.get("local")
    ]


def cuda_report(records: list[dict]) -> str:
    lines = [
        "| kernel | arch | registers | static shared B | stack B | local B |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: (r.get("name", r["kernel"]), r["arch"] or 0)):
        name = r.get("name", r["kernel"]).replace("|", "\\|")
        lines.append(
            f"| {name} | sm_{r['arch']} | {r.get('reg')} | {r.get('shared')} | "
            f"{r.get('stack')} | {r.get('local')} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- report


def problems(result: dict) -> list[str]:
    """What fails the check: compile errors, shared memory over the chip's limit, spills."""
    out = []
    for r in result["records"]:
        where = f"{r['kernel']} sm_{r['arch']} [{r['config']}] {r['case']}"
        if not r["ok"]:
            out.append(f"does not compile: {where}: {r['error'].splitlines()[-1][:300]}")
            continue
        if r["shared"] > SMEM_LIMIT[r["arch"]]:
            out.append(f"shared memory {r['shared']} B > {SMEM_LIMIT[r['arch']]} B: {where}")
        if r["spill_stores"] or r["spill_loads"]:
            out.append(f"spills {r['spill_stores']} B stored / {r['spill_loads']} B loaded: {where}")
    covered = {r["kernel"] for r in result["records"]}
    out += [f"no compile case for {k}" for k in result["kernels"] if k not in covered]
    return out


def not_wgmma(result: dict) -> list[dict]:
    """sm_90 compiles of float16/bfloat16 kernels whose dots did not (all) lower to wgmma."""
    return [
        r
        for r in result["records"]
        if r["ok"]
        and r["arch"] == 90
        and r["dtype"] in ("bf16", "fp16")
        and r["mma"]
        and not r["family"].startswith("token")
    ]


def report(result: dict) -> str:
    """Per kernel and configuration: the worst case over dtypes/flags/shapes for each arch."""
    lines = [
        f"tier {result['tier']}, triton {result['triton']}: {len(result['records'])} compiles "
        f"({result['compiled']} new) in {result['seconds']} s on {result['workers']} workers",
        "",
    ]
    rows: dict = {}
    for r in result["records"]:
        if not r["ok"]:
            continue
        operands = "tc" if r["dtype"] in ("bf16", "fp16") else r["dtype"]
        block_d = r["constexprs"].get("BLOCK_D")
        key = (r["kernel"], operands, block_d, r["config"], r["arch"])
        row = rows.setdefault(key, dict(shared=0, regs=0, spills=0, wgmma=set(), n=0))
        row["shared"] = max(row["shared"], r["shared"])
        row["regs"] = max(row["regs"], r["regs"] or 0)
        row["spills"] = max(row["spills"], (r["spill_stores"] or 0) + (r["spill_loads"] or 0))
        if r["arch"] == 90 and operands == "tc" and (r["wgmma"] or r["mma"]):
            row["wgmma"].add(f"{r['wgmma']} wgmma / {r['mma']} mma")
        row["n"] += 1
    lines.append(
        "| kernel | operands | BLOCK_D | config | arch | max shared B | max regs | spills B "
        "| sm_90 dots (wgmma / mma.sync in PTX) | compiles |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for (kernel, operands, block_d, cfg, arch), row in sorted(
        rows.items(), key=lambda i: (i[0][0], i[0][1], i[0][2] or 0, i[0][3], i[0][4])
    ):
        lines.append(
            f"| {kernel} | {operands} | {block_d or ''} | {cfg} | sm_{arch} | "
            f"{row['shared']} | {row['regs']} | {row['spills']} | "
            f"{'; '.join(sorted(row['wgmma']))} | {row['n']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="the whole product (default: core tier)")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPUs)")
    parser.add_argument("--json", default=None, help="write the records here")
    parser.add_argument("--report", action="store_true", help="print a table per kernel")
    parser.add_argument("--count", action="store_true", help="only count the compiles per kernel")
    parser.add_argument(
        "--cuda",
        default=None,
        metavar="MODULE",
        help="instead: check the CUDA kernels of a built alignkern._C (cuobjdump "
        "-res-usage): print each kernel's resources, fail on stack/local memory",
    )
    parser.add_argument(
        "--filter", default=None, help="only the compiles whose 'kernel case' label matches this regex"
    )
    args = parser.parse_args(argv)
    if args.cuda:
        records = cuda_resources(args.cuda)
        print(cuda_report(records))
        found = cuda_problems(records)
        print(f"{len(records)} CUDA kernels; {len(found)} with stack or local memory")
        for line in found:
            print("  " + line)
        return 1 if found or not records else 0
    tier = "all" if args.all else "core"
    if args.count:
        counts: dict = {}
        for job in jobs(tier, args.filter):
            name = _plans(job.case)[job.plan].name
            counts[name] = counts.get(name, 0) + 1
        for name, n in sorted(counts.items()):
            print(f"{n:6d}  {name}")
        print(f"{sum(counts.values()):6d}  total ({tier})")
        return 0
    result = run(tier, args.jobs, progress=sys.stderr.isatty(), pattern=args.filter)
    if args.json:
        Path(args.json).write_text(json.dumps(result))
    if args.report:
        print(report(result))
    found = problems(result)
    print(
        f"{len(result['records'])} compiles ({result['compiled']} new, tier {tier}) in "
        f"{result['seconds']} s; {len(found)} problems"
    )
    for line in found:
        print("  " + line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
