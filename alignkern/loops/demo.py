"""``alignkern demo [DEMO]``: each self-correction loop end to end on a tiny random model with a
tokenizer built on this machine (or ``--model DIR``, a local transformers checkpoint), printing
what happened and what it cost — decoder forwards, candidates evaluated, rows projected through
the LM head, token positions, wall time, peak memory — next to the naive way of doing the same
work, and a verdict computed from those numbers.

    python -m alignkern.loops.demo rain
    python -m alignkern.loops.demo --model ./my-llama best-of-n

The demos are listed in ``alignkern._demos.DEMOS``; those with a program of their own (``ica``)
take their own options after their name.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from .. import _demos
from .._argtypes import integer, positive_int
from ..integrations import transformers as ak_hf
from . import _common, cost, naive, tiny
from .best_of_n import best_of_n
from .check_and_correct import check_and_correct
from .judge import harmlessness_evaluator
from .rain import rain_generate
from .score import score_stage2_loss, two_attempt_rollout

LOOPS = _demos.LOOPS
PROMPTS = ("Human: How do I bake bread at home?\nAssistant:",
           "Human: Can a cat fly?\nAssistant:")

DESCRIPTION = """\
Runs alignkern's self-correction loops end to end on a tiny random Llama with a tokenizer built
on this machine (or --model DIR, a local transformers checkpoint), and prints what each cost next
to the naive way of doing the same work: decoder forwards, candidates evaluated, rows projected
through the LM head, token positions, wall time and peak memory. Each table ends with a verdict
computed from its numbers: the ratios of time, work and memory, whether the results agree, and,
where alignkern is not ahead, why.

Costs are counted in one run (hooks on the decoder, the LM head and alignkern's fused ops) and
timed in others without hooks (the median of 3 runs). The tiny model writes gibberish: the loops,
their scores and their costs are the point. Its matrices are too small to share between threads,
so it runs on one (the fastest measured; by far on a busy machine). alignkern bench times the ops
at real sizes."""

# The tiny model's matrices (H = 64) are too small to split between threads: on 1 thread every
# loop demo ran in 21-28 s on a 2-core machine at load 2-5, on 2 threads in 162-239 s (a second
# thread that waits for a busy core stalls every op it shares). A checkpoint of one's own
# (--model) keeps torch's default.
TINY_MODEL_THREADS = 1


def _epilog() -> str:
    return "\n".join(["demos:", _demos.listing(), "", "examples:",
                      "  alignkern demo                           every loop demo",
                      "  alignkern demo rain --seed 3",
                      "  alignkern demo --model ./my-llama best-of-n",
                      "  alignkern demo ica --quick               the ica demo, its own options"])


# torch.manual_seed's range (it refuses others with a bare ValueError, after the model is loaded).
SEED_RANGE = (-(2**63), 2**64 - 1)


def _seed(text: str) -> int:
    """``--seed``: an integer torch.manual_seed takes."""
    value = integer(text)
    if not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise argparse.ArgumentTypeError(f"must be in [-2**63, 2**64 - 1] (torch.manual_seed's "
                                         f"range), got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's arguments, for ``alignkern demo`` or a parser of one's own."""
    parser.add_argument("loop", nargs="?", default="all", choices=[*_demos.DEMOS, "all"],
                        metavar="DEMO", help="which demo to run (listed below; default: all, "
                                             "every loop demo)")
    parser.add_argument("--model", metavar="DIR", default=None,
                        help="a local transformers causal LM checkpoint and its tokenizer "
                             "(default: a tiny random Llama and a tokenizer built here)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when a GPU is present, else cpu")
    parser.add_argument("--seed", type=_seed, default=0, help="seed for sampling (default 0)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help=f"torch CPU threads (default: {TINY_MODEL_THREADS} with the tiny "
                             f"model, the fastest measured for its size; torch's default, "
                             f"{torch.get_num_threads()} here, with --model)")


def run(args: argparse.Namespace) -> int:
    """Run the demo for parsed ``args``; returns the exit status."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("alignkern demo: --device cuda, but torch sees no GPU", file=sys.stderr)
        return 2
    threads = args.threads or (TINY_MODEL_THREADS if args.model is None else None)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        model, tokenizer, description = _load(args.model, device)
    except ModelFolderError as exc:
        print(f"alignkern demo: error: {exc}", file=sys.stderr)
        return 2
    print(f"alignkern demo on {device} ({torch.get_num_threads()} CPU threads): {description}")
    loops = LOOPS if args.loop == "all" else (args.loop,)
    for name in loops:
        print(f"\n=== {name} ===")
        DEMOS[name](model, tokenizer, device, args.seed)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    program = _demos.program(argv)
    if program is not None:
        return program(argv[1:])
    parser = argparse.ArgumentParser(prog="alignkern demo", description=DESCRIPTION,
                                     epilog=_epilog(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.loop not in LOOPS + ("all",):  # a program of its own, after an option
        parser.error(f"{args.loop} takes options of its own: put its name first "
                     f"(alignkern demo {args.loop} --help)")
    return run(args)


# ----------------------------------------------------------------------------- setup


class ModelFolderError(ValueError):
    """``--model`` names no folder a causal LM and its tokenizer can be loaded from."""


def _check_model_folder(path: str) -> None:
    """``path`` must be a folder holding a transformers checkpoint (a ``config.json``): without
    this check transformers takes a missing folder for a hub id and says the id is malformed."""
    folder = Path(path)
    if not folder.exists():
        raise ModelFolderError(f"--model {path!r}: no such folder (give a local transformers "
                               f"checkpoint: config.json, weights and tokenizer files)")
    if not folder.is_dir():
        raise ModelFolderError(f"--model {path!r}: a file, not a folder (give the checkpoint's "
                               f"folder)")
    if not (folder / "config.json").is_file():
        raise ModelFolderError(f"--model {path!r}: the folder has no config.json, so it is not a "
                               f"transformers checkpoint")


def _load(path: str | None, device: torch.device):
    """The tiny random model and tokenizer, or a checkpoint from the folder ``path``
    (ModelFolderError when there is none, or it cannot be loaded)."""
    if path is None:
        model = tiny.tiny_model(device=device)
        config = model.config
        return model, tiny.tiny_tokenizer(), (
            f"tiny random Llama (V={config.vocab_size}, H={config.hidden_size}, "
            f"{config.num_hidden_layers} layers), tokenizer built locally")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_model_folder(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:  # what transformers raises for an incomplete checkpoint
        message = " ".join(str(exc).split())
        raise ModelFolderError(f"--model {path!r}: cannot load a causal LM and its tokenizer "
                               f"from it ({type(exc).__name__}: {message})") from exc
    return model, tokenizer, f"{type(model).__name__} from {path}"


class _Recording:
    """An evaluator that records what it was asked to score and delegates to a SelfEvaluator."""

    def __init__(self, evaluator):
        self.inner = evaluator
        self.asked: list[tuple[str, str]] = []
        self.options, self.template = evaluator.options, evaluator.template

    def score(self, prompts, responses):
        responses = [responses] if isinstance(responses, str) else list(responses)
        prompts = [prompts] * len(responses) if isinstance(prompts, str) else list(prompts)
        self.asked.append((prompts, responses))
        return self.inner.score(prompts, responses)

    def reusing_prefix_across_calls(self):
        """The inner evaluator's block (RAIN opens it for one search)."""
        return self.inner.reusing_prefix_across_calls()


def _cost_row(label: str, fn: Callable[[], object], models, device, seed: int,
              evaluations: int | None = None, repeats: int = 3) -> dict:
    """Counts from one hooked run; wall time (median) and peak memory (largest) from ``repeats``
    unhooked ones, each from the same seed."""
    torch.manual_seed(seed)
    with cost.count(*models) as counts:
        fn()

    def seeded():
        torch.manual_seed(seed)
        return fn()

    measured = cost.measure(seeded, device, repeats=repeats)
    return {"way": label, "forwards": counts.forwards, "evaluated": evaluations,
            "head rows": counts.head_rows, "positions": counts.positions,
            "wall ms": measured.wall_s * 1e3,
            "peak MiB": None if measured.peak_bytes is None else measured.peak_bytes / 2**20,
            "value": measured.value}


def _table(rows: list[dict]) -> None:
    columns = ("way", "forwards", "evaluated", "head rows", "positions", "wall ms", "peak MiB")
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  " + "  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)))


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _short(text: str, width: int = 40) -> str:
    text = text.replace("\n", " ")
    return repr(text if len(text) <= width else text[:width - 3] + "...")


# ----------------------------------------------------------------------------- verdicts

# Wall times within 10 % of each other are "about as fast" (3 runs, on a machine that may be
# busy); peak memories within 10 % or 1 MiB (the resident set's resolution here) "about the same".
SAME = 0.10
MEMORY_NOISE_MIB = 1.0
# Results agree when their largest |difference| is at most this fraction of the largest |value|
# (float32 sums of a few hundred terms, computed in another order).
AGREE = 1e-4


def _verdict(ours: dict, theirs: dict, names: tuple[str, str], model, *, items: str = "items",
             extra: str = "") -> None:
    """Print the verdict on row ``ours`` against row ``theirs`` (``_cost_row`` dicts; ``names``
    short names for them, ``items`` what their "evaluated" column counts): the ratios of wall
    time, work and peak memory, whether their values agree (when both carry one), then
    ``extra``; and, where ``ours`` is slower or holds no less memory, a line saying why, from the
    same numbers."""
    parts = [_time_phrase(ours, theirs), *_work_phrases(ours, theirs), _memory_phrase(ours, theirs)]
    line = f"verdict: {names[0]} against {names[1]}: {', '.join(p for p in parts if p)}"
    if ours.get("value") is not None and theirs.get("value") is not None:
        line += f"; {_agreement(ours['value'], theirs['value'])}"
    print(f"  {line}{extra}")
    for why in _why(ours, theirs, names[1], model, items):
        print(f"  why: {why}")


def _ratio_phrase(ours: float, theirs: float, fewer: str, more: str) -> str:
    """'2.0x <fewer>' when ``ours`` is below ``theirs`` by more than SAME, '1.3x <more>' when
    above, '' when within it."""
    if ours <= theirs / (1 + SAME):
        return f"{theirs / ours:.1f}x {fewer}" if ours > 0 else fewer
    if ours >= theirs * (1 + SAME):
        return f"{ours / theirs:.1f}x {more}" if theirs > 0 else more
    return ""


def _time_phrase(ours: dict, theirs: dict) -> str:
    return _ratio_phrase(ours["wall ms"], theirs["wall ms"], "faster", "slower") or \
        "about as fast"


def _work_phrases(ours: dict, theirs: dict) -> list[str]:
    """How the counted work differs: 'Nx fewer forwards' for large differences, '112 fewer
    positions (12%)' for small ones, '3 more forwards' where ``ours`` does more."""
    phrases = []
    for key in ("forwards", "head rows", "positions"):
        a, b = ours[key], theirs[key]
        if a < b:
            phrases.append(f"{b / a:.0f}x fewer {key}" if a and b >= 2 * a else
                           f"{b - a} fewer {key} ({(b - a) / b:.0%})")
        elif a > b:
            phrases.append(f"{a / b:.0f}x more {key}" if b and a >= 2 * b else f"{a - b} more {key}")
    return phrases


def _memory_phrase(ours: dict, theirs: dict) -> str:
    a, b = ours["peak MiB"], theirs["peak MiB"]
    if a is None or b is None:
        return "peak memory not measured"
    if abs(a - b) <= MEMORY_NOISE_MIB:
        return "about the same peak memory"
    return _ratio_phrase(a, b, "less peak memory", "more peak memory") or \
        "about the same peak memory"


def _agreement(first, second) -> str:
    a, b = (torch.as_tensor(v).double().cpu() for v in (first, second))
    difference = (a - b).abs().max().item() if a.numel() else 0.0
    scale = max(a.abs().max().item(), b.abs().max().item()) if a.numel() else 0.0
    if difference <= AGREE * scale:
        return f"the same results (max |difference| {difference:.1e})"
    return f"DIFFERENT results (max |difference| {difference:.1e}, the largest |value| {scale:.2g})"


def _why(ours: dict, theirs: dict, other: str, model, items: str) -> list[str]:
    """Why ``ours`` is slower than ``theirs`` or holds no less memory, from the counts."""
    return [why for why in (_why_slower(ours, theirs, model),
                            _why_memory(ours, theirs, other, model, items)) if why]


def _why_slower(ours: dict, theirs: dict, model) -> str:
    """What ``ours`` adds (forwards, wall time per forward) against the work it saves, or ''
    when it is not slower."""
    if not _time_phrase(ours, theirs).endswith("slower"):
        return ""
    added = [f"{ours['forwards'] - theirs['forwards']} more forwards"] \
        if ours["forwards"] > theirs["forwards"] else []
    per_forward = [row["wall ms"] / max(row["forwards"], 1) for row in (ours, theirs)]
    if per_forward[0] >= per_forward[1] * (1 + SAME):
        added.append(f"{per_forward[0]:.2f} ms of wall time per forward against "
                     f"{per_forward[1]:.2f}")
    saved = [p for p in _work_phrases(ours, theirs) if "fewer" in p]
    if not added:
        return ""
    if not saved:
        return f"slower: {' and '.join(added)}"
    config = model.config
    return (f"slower: {' and '.join(added)} outweigh the {' and '.join(saved)} it processes, on a "
            f"model this small (H = {config.hidden_size}, V = {config.vocab_size}, "
            f"{config.num_hidden_layers} layers)")


def _why_memory(ours: dict, theirs: dict, other: str, model, items: str) -> str:
    """Why ``ours`` holds more peak memory, or no less although it builds fewer logits: it
    batches what ``other`` runs one at a time, or the logits are small at this vocabulary; ''
    otherwise."""
    memory = _memory_phrase(ours, theirs)
    if memory.endswith("less peak memory") or theirs["peak MiB"] is None:
        return ""
    more = memory.endswith("more peak memory")
    if ours["forwards"] < theirs["forwards"]:
        what = f"the {ours['evaluated']} {items}" if ours.get("evaluated") else "the same work"
        return (f"more memory: it runs {what} in {ours['forwards']} batched forwards where "
                f"{other} runs {theirs['forwards']}, so more activations are alive at once"
                if more else "")
    rows = theirs["head rows"] - ours["head rows"]
    if rows <= 0:
        return ""
    vocab = model.config.vocab_size
    return (f"{'more' if more else 'no less'} memory although it projects {rows} fewer rows "
            f"through the LM head: at V = {vocab} their float32 logits are at most "
            f"{rows * vocab * 4 / 2**20:.1f} MiB, against a peak of {theirs['peak MiB']:.1f} MiB "
            f"for {other}; they grow with V")


# ----------------------------------------------------------------------------- the demos


def demo_best_of_n(model, tokenizer, device, seed: int) -> None:
    n = 8
    evaluator = harmlessness_evaluator(model, tokenizer)
    torch.manual_seed(seed)
    result = best_of_n(model, tokenizer, list(PROMPTS), n=n, evaluator=evaluator)
    print(f"{len(PROMPTS)} prompts x n={n} candidates, one generate; scored by self-evaluation "
          "(p(harmless) - p(harmful))")
    for b, prompt in enumerate(PROMPTS):
        best = int(result.best[b])
        print(f"  {_short(prompt)}: best #{best} score {result.scores[b, best]:+.4f} "
              f"{_short(result.best_candidates[b])}")
    prompts = [p for p in PROMPTS for _ in range(n)]
    responses = [c for row in result.candidates for c in row]
    print(f"\nscoring the {len(responses)} candidates (generation is the same both ways):")
    rows = [
        _cost_row("alignkern SelfEvaluator", lambda: evaluator.score(prompts, responses).score,
                  [model], device, seed, len(responses)),
        _cost_row("RAIN's way (2 unbatched full forwards each)",
                  lambda: naive.rain_reference_scores(model, evaluator, prompts, responses),
                  [model], device, seed, len(responses)),
    ]
    _table(rows)
    _verdict(rows[0], rows[1], ("SelfEvaluator", "RAIN's way"), model, items="candidates")
    _likelihood_scoring(model, tokenizer, device, seed, n)


def _likelihood_scoring(model, tokenizer, device, seed: int, n: int) -> None:
    pad = _common.pad_id(tokenizer, model)
    ids, mask = _common.left_pad(_common.encode(tokenizer, list(PROMPTS)), pad, device)
    torch.manual_seed(seed)
    out = _common.generate(model, ids, mask, {"do_sample": True, "max_new_tokens": 32}, pad=pad,
                           num_return_sequences=n)
    eos = _common.eos_ids(model, tokenizer)
    print(f"\nlikelihood scoring of the same {len(out.sequences)} sampled sequences:")

    def scored():  # no gradient, as the naive way: scores for ranking, not for training
        with torch.no_grad():
            return ak_hf.score_generations(model, out.sequences, ids.shape[1], eos_token_id=eos,
                                           attention_mask=mask)

    rows = [
        _cost_row("alignkern score_generations", scored, [model], device, seed,
                  len(out.sequences)),
        _cost_row("full logits + log_softmax",
                  lambda: naive.full_logits_likelihood(
                      model, out.sequences, ids.shape[1],
                      mask.repeat_interleave(n, 0), eos),
                  [model], device, seed, len(out.sequences)),
    ]
    _table(rows)
    _verdict(rows[0], rows[1], ("score_generations", "full logits"), model, items="sequences")


def demo_rain(model, tokenizer, device, seed: int) -> None:
    evaluator = _Recording(harmlessness_evaluator(model, tokenizer))
    settings = dict(max_new_tokens=8, max_iters=8, min_iters=6)
    prompt = PROMPTS[1]

    def run():
        return rain_generate(model, tokenizer, prompt, evaluator, **settings)

    torch.manual_seed(seed)
    with cost.count(model) as counts:
        result = run()
    print(f"RAIN's defaults but {settings}: {_short(prompt)} ->")
    print(f"  {_short(result.text, 60)}")
    for step in result.steps:
        top = sorted(step.children, key=lambda c: -c.visits)[:3]
        listed = ", ".join(f"{_short(tokenizer.decode(list(c.tokens)), 14)} "
                           f"N={c.visits:.0f} V={c.value:+.3f}" for c in top)
        print(f"  committed {_short(tokenizer.decode(list(step.tokens)), 20)} after "
              f"{step.iterations} iterations; most visited: {listed}")
    asked = list(evaluator.asked)
    evaluator.asked.clear()
    torch.manual_seed(seed)
    timed = cost.measure(run, device)
    print(f"\n{result.iterations} iterations, {result.evaluations} partial answers evaluated "
          f"in {len(asked)} batched calls:")
    inner = evaluator.inner

    def batched():  # the search's evaluator calls, replayed as they were made
        return torch.cat([inner.score(p, r).score for p, r in asked])

    def rains_way():
        return torch.cat([naive.rain_reference_scores(model, inner, p, r) for p, r in asked])

    rows = [
        {"way": "alignkern rain_generate (whole search)", "forwards": counts.forwards,
         "evaluated": result.evaluations, "head rows": counts.head_rows,
         "positions": counts.positions, "wall ms": timed.wall_s * 1e3,
         "peak MiB": None if timed.peak_bytes is None else timed.peak_bytes / 2**20},
        _cost_row("  its evaluations (SelfEvaluator)", batched, [model], device, seed,
                  result.evaluations),
        _cost_row("  the same evaluations, RAIN's way", rains_way, [model], device, seed,
                  result.evaluations, repeats=1),
    ]
    _table(rows)
    _verdict(rows[1], rows[2], ("SelfEvaluator", "RAIN's way"), model, items="partial answers")
    _decode_step(model, tokenizer, prompt, device, tokens=4)  # warm-up
    steps = sorted(_decode_step(model, tokenizer, prompt, device) for _ in range(5))
    step = steps[len(steps) // 2]  # the median of 5 runs of 16 KV-cached steps each
    print(f"  one RAIN iteration = {timed.wall_s / result.iterations * 1e3:.1f} ms = "
          f"{timed.wall_s / result.iterations / step:.1f} plain decoding steps "
          f"({step * 1e3:.2f} ms each, KV-cached, batch 1)")


def _decode_step(model, tokenizer, prompt: str, device, tokens: int = 16) -> float:
    """Seconds per greedy decoding step (batch 1, KV cache, the full-vocabulary last row)."""
    ids = torch.tensor([_common.encode(tokenizer, [prompt])[0]], device=device)
    return _common.decode_step_seconds(model, ids, tokens)


def demo_check_and_correct(model, tokenizer, device, seed: int) -> None:
    evaluator = harmlessness_evaluator(model, tokenizer)
    query = "Can a cat fly?"
    rounds = 3
    torch.manual_seed(seed)
    result = check_and_correct(model, tokenizer, query, evaluator, rounds=rounds)
    biased = check_and_correct(model, tokenizer, query, evaluator, rounds=rounds, reward_bias=4.0,
                               rank_mask=True)
    print(f"{rounds} rounds on {query!r}; reward = self-evaluation of each answer")
    for r in range(rounds):
        print(f"  round {r}: {result.rewards[r]:+.4f} {_short(result.responses[r])}   with "
              f"reward_bias=4, rank_mask: {biased.rewards[r]:+.4f} {_short(biased.responses[r])}")
    print("\nthe loop, generation and self-checks included:")

    def loop(**options):  # the rounds' rewards: the same answers give the same rewards
        return lambda: check_and_correct(model, tokenizer, query, evaluator, rounds=rounds,
                                         **options).rewards

    rows = [
        _cost_row("alignkern (shared prefix's KV cache reused)", loop(), [model], device, seed,
                  rounds),
        _cost_row("without prefix reuse", loop(reuse_prefix=False), [model], device, seed, rounds),
        _cost_row("alignkern, reward_bias=4 + rank_mask", loop(reward_bias=4.0, rank_mask=True),
                  [model], device, seed, rounds),
    ]
    _table(rows)
    bias = rows[2]["wall ms"] / rows[0]["wall ms"]
    _verdict(rows[0], rows[1], ("prefix reuse", "recomputing each context"), model,
             extra=f"; reward_bias + rank_mask take {bias:.1f}x the time of the loop without them")


def demo_score(model, tokenizer, device, seed: int) -> None:
    prompts = ["Question: what is two plus two? Answer:"] * 8
    reference = copy.deepcopy(model).eval()
    policy = copy.deepcopy(model)

    def reward(_, responses):
        return [float("o" in r) for r in responses]

    torch.manual_seed(seed)
    rollout = two_attempt_rollout(policy, tokenizer, prompts, reward,
                                  generation_kwargs={"max_new_tokens": 8})
    print(f"{len(prompts)} two-attempt rollouts, reward = 1 if the answer contains 'o'")
    metrics = rollout.metrics
    if metrics is not None:
        print(f"  Acc@t1 {metrics.acc_t1:.3f}  Acc@t2 {metrics.acc_t2:.3f}  "
              f"i->c {metrics.delta_i_to_c:.3f}  c->i {metrics.delta_c_to_i:.3f}  "
              f"mean shaped reward {rollout.shaped.mean():+.3f}")

    def step(loss_fn):
        def run():
            policy.zero_grad(set_to_none=True)
            loss = loss_fn(policy, reference, rollout, beta_kl=0.1)
            loss.backward()
            return loss.detach()
        return run

    print("\nthe stage-II loss and its backward:")
    rows = [
        _cost_row("alignkern score_stage2_loss", step(score_stage2_loss), [policy, reference],
                  device, seed),
        _cost_row("full logits + log_softmax + full KL", step(naive.stage2_loss_with_logits),
                  [policy, reference], device, seed),
    ]
    _table(rows)
    _verdict(rows[0], rows[1], ("score_stage2_loss", "full logits"), model)


DEMOS = {"best-of-n": demo_best_of_n, "rain": demo_rain, "check-and-correct": demo_check_and_correct,
         "score": demo_score}


if __name__ == "__main__":
    sys.exit(main())
