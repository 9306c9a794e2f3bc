"""alignkern.linear_logprobs against TRL's fused LM head (ChunkedLogProbFunction, the vocabulary
chunk TRL's trainers use) at the CPU sizes of issue 14, bf16 included: log-probs alone and with the
entropy, forward and forward+backward (all outputs differentiated), best of 3 runs (2 for TRL in
bf16). `alignkern bench --ops linear_logprobs linear_logprobs_entropy` measures the float32 cases
with every peer; this script adds bf16, whose peer backward GEMMs are too slow on a CPU without
bf16 FMA units for the bench's rounds (TRL's bf16 backward at V = 128256 is skipped here too).

    python benchmarks/trl_peer.py    # results/cpu-trl-peer.txt is one run's output
"""

import time

import torch
from trl.kernels import ChunkedLogProbFunction
from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as CHUNK

import alignkern

torch.manual_seed(0)


def ak(h, w, t, ent):
    r = alignkern.linear_logprobs(h, w, t, stats=("entropy",) if ent else None)
    return (r.logprobs, r.entropy) if ent else (r,)


def trl(h, w, t, ent):
    out = ChunkedLogProbFunction.apply(h, w, None, t, 1.0, CHUNK, None, 1.0, ("entropy",) if ent else ())
    return (out[0], out[1]) if ent else (out[0],)


def timed(fn, h, w, t, ent, bwd, reps):
    best = float("inf")
    for _ in range(reps):
        hh, ww = h.detach().requires_grad_(bwd), w.detach().requires_grad_(bwd)
        t0 = time.perf_counter()
        outs = fn(hh, ww, t, ent)
        if bwd:
            torch.autograd.grad(outs, (hh, ww), [torch.ones_like(o) for o in outs])
        best = min(best, time.perf_counter() - t0)
    return best


CASES = [
    (512, 256, 32000, torch.float32),
    (512, 256, 128256, torch.float32),
    (1024, 512, 32000, torch.float32),
    (512, 256, 32000, torch.bfloat16),
    (512, 256, 128256, torch.bfloat16),
]
for n, hd, v, dt in CASES:
    h = torch.randn(n, hd).to(dt)
    w = (torch.randn(v, hd) / hd**0.5).to(dt)
    t = torch.randint(0, v, (n,))
    for ent in (False, True):
        for bwd in (False, True):
            if dt == torch.bfloat16 and bwd and v > 32000:
                continue
            a = timed(ak, h, w, t, ent, bwd, 3)
            b = timed(trl, h, w, t, ent, bwd, 2 if dt == torch.bfloat16 else 3)
            what = f"{'entropy' if ent else 'logprobs'} {'fwd+bwd' if bwd else 'fwd'}"
            print(
                f"N={n} H={hd} V={v} {str(dt)[6:]} {what}: "
                f"alignkern {a * 1e3:.0f} ms, trl {b * 1e3:.0f} ms, trl/alignkern {b / a:.2f}x",
                flush=True,
            )
