"""The loop benchmark behind ``alignkern bench --loops``: what alignkern's loops cost against the
naive ways, on a random Llama with a realistic LM head (V = 32000) and the tokenizer of
``alignkern.loops.tiny`` (nothing is downloaded).

Three measurements, each a list of result rows (dicts):

* ``self_eval``: scoring N candidate answers with a RAIN-style judge behind a few-shot prefix —
  alignkern's ``SelfEvaluator`` (batched, both option orders, the prefix's KV cache reused; warm:
  the prefix cached by an earlier call as in a search, cold: a fresh evaluator) against RAIN's
  reference scoring (two unbatched full-vocabulary forwards per candidate), at the same scores
  (``max_abs_diff``). Goal: ``ratio`` (reference ms / alignkern ms) >= 4 at N = 8 and 32.
* ``rain_iteration``: one ``rain_generate`` iteration (RAIN's defaults: 10 children of 1, 2, 4
  tokens, top-k 15, all evaluated in one batch) as a multiple of one plain decoding step (batch
  1, KV cache) on the same model.
* ``best_of_n_scoring``: the likelihood of N sampled answers, ``score_generations`` against a
  full-logits ``log_softmax``: time and peak memory.

    alignkern bench --loops [--quick] [--device cpu|cuda] [--out DIR]
    python -m alignkern.bench.loops [--quick] [--device cpu|cuda] [--threads N] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import sys
from pathlib import Path

import torch

FEW_SHOT = (
    "You are a careful judge of conversations between a human and an assistant. For each one, "
    "decide whether the assistant's response is harmless or harmful. A response that refuses a "
    "harmful request is harmless; a response that helps with a harmful request is harmful.\n\n"
    "Human: How do I bake bread at home?\nAssistant: Mix flour, water, salt and yeast, let the "
    "dough rise for an hour, shape it, then bake it in a hot oven until the crust is brown.\n"
    "Options:\n(A) The assistant's response is harmless.\n(B) The assistant's response is "
    "harmful.\nThe answer is: (A) The assistant's response is harmless. It explains a common "
    "recipe and nothing in it can hurt anyone.\n\n"
    "Human: How can I get into my neighbour's house when they are away?\nAssistant: You could "
    "look for a spare key under the mat or pick the lock of the back door.\nOptions:\n(A) The "
    "assistant's response is harmful.\n(B) The assistant's response is harmless.\nThe answer is: "
    "(A) The assistant's response is harmful. It helps someone enter another person's home "
    "without permission, which is illegal.\n\n"
    "Human: Can you tell me where my coworker lives? I need to see her tonight.\nAssistant: I "
    "cannot share someone's address without their consent, but you could ask her directly.\n"
    "Options:\n(A) The assistant's response is harmless.\n(B) The assistant's response is "
    "harmful.\nThe answer is: (A) The assistant's response is harmless. It protects the "
    "coworker's privacy and suggests a respectful alternative.\n\n"
)
WORDS = ("the", "assistant", "answer", "bread", "oven", "water", "question", "cat", "fly", "blue",
         "sky", "yes", "no", "help", "home", "careful", "reward", "better", "salt", "flour",
         "rise", "hot", "clear", "day", "without", "write", "mistake", "correct", "again")


def _model(device: torch.device, quick: bool):
    from ..loops import tiny

    if quick:
        return tiny.tiny_model(vocab_size=8192, hidden_size=128, num_layers=2, num_heads=4,
                               num_kv_heads=4, intermediate_size=256, device=device)
    return tiny.tiny_model(vocab_size=32000, hidden_size=256, num_layers=4, num_heads=4,
                           num_kv_heads=4, intermediate_size=688, device=device)


def _responses(n: int, words: int = 24, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."
            for _ in range(n)]


def _config(model, extra: str) -> str:
    c = model.config
    return (f"Llama V={c.vocab_size} H={c.hidden_size} L={c.num_hidden_layers} "
            f"{str(model.dtype).removeprefix('torch.')} {extra}")


def _row(case: str, config: str, provider: str, device, **values) -> dict:
    return {"case": case, "config": config, "provider": provider, "device": _device_name(device),
            "threads": torch.get_num_threads(), **values}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------- self-evaluation


def bench_self_eval(model, tokenizer, device, n_values, repeats: int) -> list[dict]:
    rows = []
    for n in n_values:
        rows += _self_eval_case(model, tokenizer, device, n, repeats)
    return rows


def _self_eval_case(model, tokenizer, device, n: int, repeats: int) -> list[dict]:
    from ..loops import cost, naive
    from ..loops.judge import HARMLESS_TEMPLATE, harmlessness_evaluator

    template = FEW_SHOT + HARMLESS_TEMPLATE
    prompt = "Human: Can a cat fly without help?"
    responses = _responses(n)
    config = _config(model, f"N={n} prefix={len(tokenizer(FEW_SHOT)['input_ids'])} tokens")
    # the model stays fixed during the benchmark, so the prefix may be kept across calls
    warm = harmlessness_evaluator(model, tokenizer, template=template,
                                  reuse_prefix_across_calls=True)
    warm.score(prompt, responses[:1])  # builds the prefix cache, as the first call of a search

    def cached():
        return warm.score(prompt, responses).score

    def cold():
        return harmlessness_evaluator(model, tokenizer, template=template).score(
            prompt, responses).score

    def reference():
        return naive.rain_reference_scores(model, warm, [prompt] * n, responses)

    with torch.no_grad():
        ours = cost.measure(cached, device, repeats=repeats)
        ours_cold = cost.measure(cold, device, repeats=repeats)
        theirs = cost.measure(reference, device, repeats=max(1, repeats // 2))
    diff = float((ours.value - theirs.value).abs().max())
    with cost.count(model) as counted:
        cached()
    with cost.count(model) as counted_cold:
        cold()
    with cost.count(model) as counted_ref:
        reference()
    rows = []
    for provider, m, c in (("alignkern (prefix cached)", ours, counted),
                           ("alignkern (cold)", ours_cold, counted_cold),
                           ("rain-reference", theirs, counted_ref)):
        ours_row = m is not theirs
        rows.append(_row("self_eval", config, provider, device, ms=m.wall_s * 1e3,
                         peak_mib=_mib(m.peak_bytes), forwards=c.forwards,
                         positions=c.positions, head_rows=c.head_rows,
                         ratio=theirs.wall_s / m.wall_s if ours_row else None,
                         max_abs_diff=diff if ours_row else None))
    return rows


# ----------------------------------------------------------------------------- RAIN iteration


def bench_rain_iteration(model, tokenizer, device, iterations: int) -> list[dict]:
    from ..loops import _common, cost
    from ..loops.judge import HARMLESS_TEMPLATE, harmlessness_evaluator
    from ..loops.rain import rain_generate

    prompt = "Human: Can a cat fly without help?\nAssistant:"
    evaluator = harmlessness_evaluator(model, tokenizer, template=FEW_SHOT + HARMLESS_TEMPLATE)
    evaluator.score(prompt, ["warm-up"])
    settings = dict(max_new_tokens=7, min_iters=iterations, max_iters=iterations)

    def search():
        torch.manual_seed(0)
        return rain_generate(model, tokenizer, prompt, evaluator, **settings)

    with cost.count(model) as counted:
        result = search()
    timed = cost.measure(search, device)
    ids = torch.tensor([_common.encode(tokenizer, [prompt])[0]], device=device)
    _common.decode_step_seconds(model, ids, 4)  # warm-up
    steps = sorted(_common.decode_step_seconds(model, ids, 16) for _ in range(5))
    step_s = steps[len(steps) // 2]
    per_iteration = timed.wall_s / result.iterations
    config = _config(model, f"expand=10 lengths=1,2,4 top_k=15, {result.iterations} iterations, "
                            f"{result.evaluations} evaluations")
    return [
        _row("rain_iteration", config, "alignkern rain_generate", device,
             ms=per_iteration * 1e3, peak_mib=_mib(timed.peak_bytes),
             forwards=counted.forwards / result.iterations,
             positions=counted.positions / result.iterations,
             head_rows=counted.head_rows / result.iterations,
             evaluations=result.evaluations / result.iterations,
             ratio=per_iteration / step_s),
        _row("rain_iteration", config, "plain decoding step", device, ms=step_s * 1e3,
             forwards=1, positions=1, head_rows=1),
    ]


# ----------------------------------------------------------------------------- best-of-N scoring


def bench_best_of_n_scoring(model, device, n_values, prompt_length: int, generated: int,
                            repeats: int) -> list[dict]:
    rows = []
    for n in n_values:
        rows += _best_of_n_case(model, device, n, prompt_length, generated, repeats)
    return rows


def _best_of_n_case(model, device, n: int, prompt_length: int, generated: int,
                    repeats: int) -> list[dict]:
    from ..integrations import transformers as ak_hf
    from ..loops import cost, naive

    gen = torch.Generator().manual_seed(n)
    sequences = torch.randint(3, model.config.vocab_size, (n, prompt_length + generated),
                              generator=gen).to(device)
    mask = torch.ones(n, prompt_length, dtype=torch.long, device=device)
    config = _config(model, f"N={n} prompt={prompt_length} generated={generated}")

    def ours():
        with torch.no_grad():
            return ak_hf.score_generations(model, sequences, prompt_length, eos_token_id=[],
                                           attention_mask=mask).cpu()

    def full():
        return naive.full_logits_likelihood(model, sequences, prompt_length, mask, [])

    a = cost.measure(ours, device, repeats=repeats)
    b = cost.measure(full, device, repeats=repeats)
    diff = float((a.value - b.value).abs().max())
    return [
        _row("best_of_n_scoring", config, "alignkern score_generations", device,
             ms=a.wall_s * 1e3, peak_mib=_mib(a.peak_bytes), forwards=1,
             positions=n * (prompt_length + generated), head_rows=n * generated,
             ratio=b.wall_s / a.wall_s, memory_ratio=_ratio(b.peak_bytes, a.peak_bytes),
             max_abs_diff=diff),
        _row("best_of_n_scoring", config, "full logits + log_softmax", device,
             ms=b.wall_s * 1e3, peak_mib=_mib(b.peak_bytes), forwards=1,
             positions=n * (prompt_length + generated),
             head_rows=n * (prompt_length + generated)),
    ]


def _mib(value: int | None) -> float | None:
    return None if value is None else value / 2**20


def _ratio(a: int | None, b: int | None) -> float | None:
    return None if not a or not b else a / b


# ----------------------------------------------------------------------------- runner


def run_loops_benchmark(device: str | torch.device | None = None, *, quick: bool = False,
                        n_values: tuple[int, ...] | None = None,
                        out_dir: str | os.PathLike | None = None,
                        print_report: bool = False) -> list[dict]:
    """Run the loop benchmark on ``device`` (default: cuda if present, else cpu) and return its
    rows. Callable with no arguments.

    Returns result rows, each a dict with ``case`` (``self_eval``, ``rain_iteration``,
    ``best_of_n_scoring``), ``config``, ``provider``, ``device``, ``threads``, ``ms`` (median
    wall time), ``peak_mib`` (peak memory rise; CPU: the resident set), and where they apply
    ``forwards``, ``positions`` and ``head_rows`` (decoder forwards, token positions and rows
    through the full LM head, counted in a separate run), ``ratio`` (self_eval and best-of-N:
    the naive way's time over alignkern's; rain_iteration: one iteration over one decoding step),
    ``memory_ratio`` and ``max_abs_diff`` (between the two ways' scores).

    Output: by default nothing is printed and no file is written (``alignkern bench --loops``
    prints ``format_report(rows)`` and writes the CSV itself). ``print_report=True`` prints
    ``format_report(rows)`` to stdout; ``out_dir`` (created if missing) receives the rows as
    ``<device>-loops.csv`` (one column per key; the path is printed when ``print_report``).

    Args:
        device: ``"cpu"``, ``"cuda"`` or a ``torch.device``.
        quick: a smaller model (V = 8192, H = 128, 2 layers), N = 8 only, fewer repeats; the
            default model is a random Llama with V = 32000, H = 256, 4 layers.
        n_values: the candidate counts N of ``self_eval`` and ``best_of_n_scoring`` (default
            (8, 32); quick: (8,)).
        out_dir: where to write the CSV, or None.
        print_report: print the report.
    """
    from ..loops import tiny
    from . import shared_prefix

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n_values = tuple(n_values or ((8,) if quick else (8, 32)))
    repeats = 2 if quick else 3
    model = _model(device, quick)
    tokenizer = tiny.tiny_tokenizer()
    rows = bench_self_eval(model, tokenizer, device, n_values, repeats)
    rows += bench_rain_iteration(model, tokenizer, device, 3 if quick else 6)
    rows += bench_best_of_n_scoring(model, device, n_values, 64 if quick else 128,
                                    32 if quick else 64, repeats)
    rows += shared_prefix.bench_self_eval_prefix(
        model, tokenizer, device, (8,) if quick else (8, 32, 128),
        (256,) if quick else (1000, 4000), repeats)
    rows += shared_prefix.bench_best_of_n_sampling(
        model, device, (4, 8) if quick else (8, 32), 256 if quick else 1000, 8 if quick else 16,
        repeats)
    return report_rows(rows, device, out_dir, print_report, format_report)


def report_rows(rows: list[dict], device, out_dir, print_report: bool, format_report,
                name: str = "loops") -> list[dict]:
    """The end of a run of this or another benchmark that runs alone (``bench --trl``): print
    ``format_report(rows)`` if asked, write the rows to ``out_dir`` if given; returns ``rows``."""
    if print_report:
        print(format_report(rows))
    if out_dir is not None:
        path = write_csv(rows, device, out_dir, name)
        if print_report:
            print(f"\nrows written to {path}")
    return rows


def write_csv(rows: list[dict], device: str | torch.device, out_dir: str | os.PathLike,
              name: str = "loops") -> Path:
    """Write ``rows`` (dicts, their keys in first-seen order as columns) to
    ``out_dir/<device>-<name>.csv`` (the folder is created); returns the path. ``bench --trl``
    writes its rows with it too."""
    from .report import device_slug

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{device_slug(torch.device(device))}-{name}.csv"
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def format_report(rows: list[dict]) -> str:
    """A plain-text table of ``run_loops_benchmark``'s rows and the goals' verdicts."""
    columns = (("provider", "provider"), ("ms", "ms"), ("peak_mib", "peak MiB"),
               ("forwards", "fwd"), ("positions", "positions"), ("head_rows", "head rows"),
               ("ratio", "ratio"), ("memory_vs_one_at_a_time", "memory / RAIN's"),
               ("max_abs_diff", "max |diff|"))
    lines = []
    if rows:
        lines.append(f"loop benchmark on {rows[0]['device']}")
    for case in dict.fromkeys(r["case"] for r in rows):
        group = [r for r in rows if r["case"] == case]
        for config in dict.fromkeys(r["config"] for r in group):
            lines.append(f"\n{case}: {config}")
            cells = [[_fmt(r.get(key)) for key, _ in columns]
                     for r in group if r["config"] == config]
            widths = [max(len(title), *(len(c[i]) for c in cells))
                      for i, (_, title) in enumerate(columns)]
            lines.append("  " + "  ".join(t.ljust(w) for (_, t), w in zip(columns, widths)))
            lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(c, widths)) for c in cells]
    lines.append("")
    lines += _verdicts(rows)
    from .shared_prefix import verdicts

    lines += verdicts(rows)
    return "\n".join(lines)


def _verdicts(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r["case"] == "self_eval" and r.get("ratio") is not None:
            n = r["config"].split("N=")[1].split()[0]
            verdict = "met" if r["ratio"] >= 4 else "NOT met"
            out.append(f"goal self-evaluation >= 4x cheaper than RAIN's scoring, N={n}, "
                       f"{r['provider']}: {r['ratio']:.1f}x ({verdict}); scores agree to "
                       f"{r['max_abs_diff']:.1e}")
        if r["case"] == "rain_iteration" and r.get("ratio") is not None:
            out.append(f"one RAIN iteration = {r['ratio']:.1f} plain decoding steps "
                       f"({r['ms']:.1f} ms, {r['forwards']:.1f} forwards, "
                       f"{r['evaluations']:.1f} evaluations per iteration)")
        if r["case"] == "best_of_n_scoring" and r.get("memory_ratio") is not None:
            n = r["config"].split("N=")[1].split()[0]
            out.append(f"best-of-N scoring, N={n}: peak memory {r['peak_mib']:.1f} MiB vs "
                       f"{r['peak_mib'] * r['memory_ratio']:.1f} MiB with full logits "
                       f"({r['memory_ratio']:.1f}x less), {r['ratio']:.2f}x the speed")
    return out


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and abs(value) < 1e-2:
            return f"{value:.1e}"
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    return standalone_main(argv, "alignkern.bench.loops", __doc__, "a smaller model, N = 8 only",
                           "loops", run_loops_benchmark)


def standalone_main(argv, module: str, doc: str, quick_help: str, name: str, run) -> int:
    """``python -m <module>`` for a benchmark that runs alone: ``run(device, quick=, out_dir=,
    print_report=True)`` with --quick, --device, --threads and --out."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help=f"also write the rows to DIR/<device>-{name}.csv")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    run(args.device, quick=args.quick, out_dir=args.out, print_report=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
