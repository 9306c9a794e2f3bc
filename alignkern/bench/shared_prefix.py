"""The prefix-sharing rows of ``alignkern bench --loops``: what holding a shared text's KV cache
once (``SharedPrefixCache``) saves the loops, against the ways it replaces, on the loop
benchmark's model.

* ``self_eval_prefix``: ``SelfEvaluator`` scoring N candidates behind a judge prefix of about
  1,000 or 4,000 tokens — sharing the prefix (alignkern now) against (a) the per-row copy of its
  cache (alignkern before), (b) RAIN's one-at-a-time scoring (two unbatched full forwards per
  candidate), (c) no reuse (every row runs the whole prefix). The baselines run only where they
  fit the machine (``COPY_BUDGET``, ``ONE_AT_A_TIME_BUDGET``: N x prefix tokens).
* ``best_of_n_sampling``: N samples of one long prompt, ``best_of_n``'s sampling (the prompt's KV
  computed and held once) against ``generate(num_return_sequences=N)`` (the prompt prefilled and
  held N times).
"""

from __future__ import annotations

import random

import torch

# Largest N x prefix tokens at which each baseline runs (the per-row copy holds 2N copies of the
# prefix's KV: at N = 128 and 4,000 tokens on the default model, 8 GiB).
COPY_BUDGET = 128 * 1000
ONE_AT_A_TIME_BUDGET = 32 * 1000


def filler_text(tokenizer, tokens: int, seed: int = 0) -> str:
    """Words of the loop benchmark's vocabulary, as many as fit in ``tokens`` tokens."""
    from .loops import WORDS

    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(tokens)]  # at least one token each

    def length(k: int) -> int:
        return len(tokenizer(" ".join(words[:k]))["input_ids"])

    low, high = 1, len(words)
    while low < high:  # the most words whose text fits
        middle = (low + high + 1) // 2
        low, high = (middle, high) if length(middle) <= tokens else (low, middle - 1)
    return " ".join(words[:low]).capitalize() + ".\n\n"


# ----------------------------------------------------------------------------- self-evaluation


def bench_self_eval_prefix(model, tokenizer, device, n_values, prefix_lengths,
                           repeats: int) -> list[dict]:
    rows = []
    for length in prefix_lengths:
        for n in n_values:
            rows += _self_eval_prefix_case(model, tokenizer, device, n, length, repeats)
    return rows


def _self_eval_prefix_case(model, tokenizer, device, n: int, length: int,
                           repeats: int) -> list[dict]:
    from ..loops import cost, naive
    from ..loops.judge import HARMLESS_TEMPLATE, harmlessness_evaluator
    from .loops import _config, _mib, _ratio, _responses, _row

    template = filler_text(tokenizer, length) + HARMLESS_TEMPLATE
    prompt = "Human: Can a cat fly without help?"
    responses = _responses(n)
    shared = harmlessness_evaluator(model, tokenizer, template=template)
    copied = harmlessness_evaluator(model, tokenizer, template=template)
    copied._share_prefix = False
    fresh = harmlessness_evaluator(model, tokenizer, template=template, reuse_prefix=False)
    prefix = len(shared._prefix_ids)
    config = _config(model, f"N={n} prefix={prefix} tokens")
    providers = [("alignkern shared prefix", lambda: shared.score(prompt, responses).score,
                  repeats)]
    if n * length <= COPY_BUDGET:
        providers.append(("per-row copy (before)",
                          lambda: copied.score(prompt, responses).score, repeats))
    if n * length <= ONE_AT_A_TIME_BUDGET:
        providers.append(("rain one-at-a-time", lambda: naive.rain_reference_scores(
            model, shared, [prompt] * n, responses), 1))
        providers.append(("no reuse", lambda: fresh.score(prompt, responses).score, 1))
    with torch.no_grad():
        measured = {name: cost.measure(fn, device, repeats=r) for name, fn, r in providers}
    ours = measured["alignkern shared prefix"]
    copy = measured.get("per-row copy (before)")
    one_at_a_time = measured.get("rain one-at-a-time")
    rows = []
    for name, m in measured.items():
        mine = m is ours
        rows.append(_row(
            "self_eval_prefix", config, name, device, ms=m.wall_s * 1e3,
            peak_mib=_mib(m.peak_bytes),
            ratio=None if not mine or copy is None else copy.wall_s / ours.wall_s,
            memory_vs_one_at_a_time=None if not mine or one_at_a_time is None
            else _ratio(ours.peak_bytes, one_at_a_time.peak_bytes),
            max_abs_diff=None if mine else float((m.value - ours.value).abs().max())))
    return rows


# ----------------------------------------------------------------------------- best-of-N


def bench_best_of_n_sampling(model, device, n_values, prompt_length: int, new_tokens: int,
                             repeats: int) -> list[dict]:
    rows = []
    for n in n_values:
        rows += _best_of_n_sampling_case(model, device, n, prompt_length, new_tokens, repeats)
    return rows


def _best_of_n_sampling_case(model, device, n: int, prompt_length: int, new_tokens: int,
                             repeats: int) -> list[dict]:
    from ..loops import _common, cost
    from ..loops.best_of_n import _sample
    from .loops import _config, _mib, _ratio, _row

    generator = torch.Generator().manual_seed(prompt_length)
    ids = torch.randint(3, model.config.vocab_size, (1, prompt_length), generator=generator)
    ids, mask = ids.to(device), torch.ones_like(ids, device=device)
    kwargs = dict(do_sample=True, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    config = _config(model, f"N={n} prompt={prompt_length} new={new_tokens}")

    def shared():
        torch.manual_seed(n)
        return _sample(model, ids, mask, n, kwargs, pad=0).sequences

    def stock():
        torch.manual_seed(n)
        return _common.generate(model, ids, mask, kwargs, pad=0,
                                num_return_sequences=n).sequences

    a = cost.measure(shared, device, repeats=repeats)
    b = cost.measure(stock, device, repeats=repeats)
    same = bool(torch.equal(a.value, b.value))
    return [
        _row("best_of_n_sampling", config, "alignkern (prompt shared)", device,
             ms=a.wall_s * 1e3, peak_mib=_mib(a.peak_bytes), ratio=b.wall_s / a.wall_s,
             memory_ratio=_ratio(b.peak_bytes, a.peak_bytes), same_tokens=same),
        _row("best_of_n_sampling", config, "generate(num_return_sequences)", device,
             ms=b.wall_s * 1e3, peak_mib=_mib(b.peak_bytes)),
    ]


# ----------------------------------------------------------------------------- verdicts


def verdicts(rows: list[dict]) -> list[str]:
    """The issue's goals for these rows, each met or not, from the measured numbers."""
    out = []
    for r in rows:
        if r["case"] != "self_eval_prefix" or r["provider"] != "alignkern shared prefix":
            continue
        n = int(r["config"].split("N=")[1].split()[0])
        tokens = int(r["config"].split("prefix=")[1].split()[0])
        where = f"N={n}, prefix {tokens} tokens"
        if r.get("ratio") is not None:
            goal = " (goal >= 2x at N=32, ~1000 tokens: " + (
                "met)" if r["ratio"] >= 2 else "NOT met)") if n == 32 and tokens <= 1100 else ""
            out.append(f"self-evaluation, {where}: {r['ratio']:.1f}x faster than the per-row "
                       f"copy{goal}")
        if r.get("memory_vs_one_at_a_time") is not None:
            ratio = r["memory_vs_one_at_a_time"]
            goal = " (goal <= 1.2x at N=32: " + ("met)" if ratio <= 1.2 else "NOT met)") \
                if n == 32 else ""
            out.append(f"self-evaluation, {where}: peak memory {ratio:.2f}x RAIN's "
                       f"one-at-a-time scoring{goal}")
    sampling = [r for r in rows if r["case"] == "best_of_n_sampling"]
    by_provider: dict[str, list[dict]] = {}
    for r in sampling:
        by_provider.setdefault(r["provider"], []).append(r)
    for provider, group in by_provider.items():
        if len(group) >= 2 and all(r.get("peak_mib") is not None for r in group):
            first, last = group[0], group[-1]
            out.append(f"best-of-N sampling, {provider}: peak {first['peak_mib']:.0f} MiB at "
                       f"{first['config'].split('N=')[1].split()[0]} samples, "
                       f"{last['peak_mib']:.0f} MiB at "
                       f"{last['config'].split('N=')[1].split()[0]}")
    for r in sampling:
        if r.get("same_tokens") is not None:
            n = r["config"].split("N=")[1].split()[0]
            out.append(f"best-of-N sampling, N={n}: {r['ratio']:.1f}x faster than "
                       f"generate(num_return_sequences), the same tokens: {r['same_tokens']}")
    return out
