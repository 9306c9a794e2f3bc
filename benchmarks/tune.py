"""Run every Triton kernel's autotuner once at the benchmark sizes (bfloat16) and record the
winning configurations.

    python benchmarks/tune.py OUTDIR     # writes OUTDIR/tuning.json and OUTDIR/tuning.csv

Each case runs one op forward and backward on the Triton backend with autotuning on
(``ALIGNKERN_AUTOTUNE=1``), so every kernel the op launches tunes its space for that key; the
choice and the time of every configuration are then read back from the autotuners
(``alignkern/triton_kernels/_tuning.py``). Without a GPU it prints ``no GPU: skipped`` and writes
a tuning.json that says so. A case that fails is recorded and the next one runs.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ["ALIGNKERN_AUTOTUNE"] = "1"

import torch  # noqa: E402


def _cases(device):
    """(name, sizes, function running forward + backward) at the sizes of `alignkern bench
    --quick` on a GPU (alignkern/bench/*.py; the attention uses its bias and ranks)."""
    import alignkern

    bf16 = torch.bfloat16

    def token(rows, vocab):
        logits = torch.randn(rows, vocab, device=device, dtype=bf16, requires_grad=True)
        targets = torch.randint(0, vocab, (rows,), device=device)
        return lambda: alignkern.token_logprobs(logits, targets).sum().backward()

    def linear(rows, hidden, vocab):
        h = (torch.randn(rows, hidden, device=device, dtype=bf16) * 0.05).requires_grad_(True)
        w = (torch.randn(vocab, hidden, device=device, dtype=bf16) * 0.05).requires_grad_(True)
        targets = torch.randint(0, vocab, (rows,), device=device)
        return lambda: alignkern.linear_logprobs(h, w, targets).sum().backward()

    def kl(rows, hidden, vocab):
        from alignkern.ops.linear_kl import linear_kl

        h, rh = (torch.randn(rows, hidden, device=device, dtype=bf16) * 0.05 for _ in range(2))
        w, rw = (torch.randn(vocab, hidden, device=device, dtype=bf16) * 0.05 for _ in range(2))
        h.requires_grad_(True)
        w.requires_grad_(True)
        return lambda: linear_kl(h, w, rh, rw).sum().backward()

    def attention(batch, heads, length, head_dim, causal):
        q, k, v = (
            torch.randn(batch, heads, length, head_dim, device=device, dtype=bf16, requires_grad=True)
            for _ in range(3)
        )
        # As alignkern/bench/reward_attention.py makes them: a (B, L) key bias in q's dtype and
        # float ranks.
        bias = torch.randn(batch, length, device=device, dtype=bf16).requires_grad_(True)
        rank = torch.randint(0, 8, (batch, length), device=device).float()
        return lambda: (
            alignkern.reward_attention(q, k, v, key_bias=bias, key_rank=rank, query_rank=rank, causal=causal)
            .sum()
            .backward()
        )

    out = []
    for vocab in (32000, 128256):
        out.append(("token_logprobs", dict(rows=8192, vocab=vocab), token, (8192, vocab)))
    for rows in (1024, 8192):
        out.append(
            ("linear_logprobs", dict(rows=rows, hidden=4096, vocab=128256), linear, (rows, 4096, 128256))
        )
    out.append(("linear_kl", dict(rows=4096, hidden=4096, vocab=128256), kl, (4096, 4096, 128256)))
    for length in (512, 2048):
        for causal in (False, True):
            out.append(
                (
                    "reward_attention",
                    dict(batch=16384 // length, heads=16, length=length, head_dim=64, causal=causal),
                    attention,
                    (16384 // length, 16, length, 64, causal),
                )
            )
    return out


# The CUDA kernels' template choices (csrc/cuda/tuning.cuh): (choice, values, op it times).
CUDA_CHOICES = (
    ("token_threads", (256, 512, 1024), "token_logprobs"),
    ("linear_kbk", (32, 64), "linear_logprobs"),
)


def _tune_cuda(device, cases) -> list[dict]:
    """Time each value of each CUDA tuning choice on the first benchmark case of its op
    (forward + backward on the cuda backend), ALIGNKERN_CUDA_CONFIG set per value."""
    import triton

    import alignkern
    from alignkern import _backend

    out = []
    for choice, values, op in CUDA_CHOICES:
        name, sizes, make, args = next(c for c in cases if c[0] == op)
        entry = dict(op=name, sizes=sizes, choice=choice, ms={})
        reason = _backend.unavailable_reason("cuda", device)
        if reason is not None:
            entry.update(ok=False, error=f"cuda backend unavailable: {reason}")
            out.append(entry)
            print(f"cuda {choice}: skipped ({reason})")
            continue
        try:
            with alignkern.use_backend("cuda"):
                step = make(*args)
                for value in values:
                    os.environ["ALIGNKERN_CUDA_CONFIG"] = f"{choice}={value}"
                    entry["ms"][f"{choice}={value}"] = triton.testing.do_bench(step, warmup=25, rep=100)
            entry["best"] = min(entry["ms"], key=entry["ms"].get)
            entry["ok"] = True
        except Exception as exc:  # record it; the next choice still runs
            entry.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        finally:
            os.environ.pop("ALIGNKERN_CUDA_CONFIG", None)
        out.append(entry)
        print(
            f"cuda {choice} on {name} {sizes}: {entry.get('best', entry.get('error'))} "
            f"{ {k: round(v, 3) for k, v in entry['ms'].items()} }"
        )
    return out


def _label(cfg) -> str:
    from alignkern.triton_kernels import _tuning

    return _tuning.config_label(cfg)


def _snapshot() -> dict:
    from alignkern.triton_kernels import _tuning

    return {
        (ident, key): cfg
        for ident, tuner in _tuning.autotuners().items()
        for key, cfg in getattr(tuner, "cache", {}).items()
    }


def main(argv: list[str]) -> int:
    out_dir = Path(argv[1] if len(argv) > 1 else "tuning-out")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("no GPU: skipped (the autotuners only time configurations on a CUDA GPU)")
        (out_dir / "tuning.json").write_text(json.dumps(dict(skipped="no GPU"), indent=1))
        return 0
    import alignkern
    from alignkern.triton_kernels import _tuning

    device = torch.device("cuda")
    rows, results = [], []
    with alignkern.use_backend("triton"):
        for name, sizes, make, args in _cases(device):
            before = _snapshot()
            started = time.perf_counter()
            entry = dict(op=name, sizes=sizes)
            try:
                make(*args)()
                torch.cuda.synchronize()
                entry["ok"] = True
            except Exception as exc:  # record it; the next case still runs
                entry.update(
                    ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-3000:]
                )
            entry["seconds"] = round(time.perf_counter() - started, 2)
            tuned = []
            for (ident, key), cfg in _snapshot().items():
                if (ident, key) in before:
                    continue
                tuner = _tuning.autotuners()[ident]
                timings = getattr(tuner, "configs_timings", None) or {}
                times = {_label(c): (t[0] if isinstance(t, (list, tuple)) else t) for c, t in timings.items()}
                tuned.append(
                    dict(
                        kernel=ident[0],
                        key=[repr(k) for k in key],
                        best=_label(cfg),
                        space=list(ident[1]),
                        ms=times,
                    )
                )
                for label, ms in times.items():
                    rows.append(
                        dict(
                            op=name,
                            sizes=json.dumps(sizes),
                            kernel=ident[0],
                            key=" ".join(repr(k) for k in key),
                            config=label,
                            ms=ms,
                            best=label == _label(cfg),
                        )
                    )
            entry["tuned"] = tuned
            results.append(entry)
            state = "ok" if entry["ok"] else "FAILED " + entry["error"][:200]
            print(f"{name} {sizes}: {state} in {entry['seconds']} s")
            for t in tuned:
                print(f"  {t['kernel']}: {t['best']}  ({len(t['space'])} configurations)")
    for entry in _tune_cuda(device, _cases(device)):
        results.append(entry)
        for label, ms in entry.get("ms", {}).items():
            rows.append(
                dict(
                    op=entry["op"],
                    sizes=json.dumps(entry["sizes"]),
                    kernel=f"cuda:{entry['choice']}",
                    key="",
                    config=label,
                    ms=ms,
                    best=label == entry.get("best"),
                )
            )
    env = dict(
        device=torch.cuda.get_device_name(device),
        torch=torch.__version__,
        triton=__import__("triton").__version__,
    )
    (out_dir / "tuning.json").write_text(json.dumps(dict(env=env, results=results), indent=1))
    with open(out_dir / "tuning.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["op", "sizes", "kernel", "key", "config", "ms", "best"])
        writer.writeheader()
        writer.writerows(rows)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
