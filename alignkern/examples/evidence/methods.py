"""Each way of answering, run on the same held-out problems through the loops' public APIs, with
its accuracy and what it cost.

Costs: ``forwards`` counts calls of the model's decoder (one batched call counts once),
``tokens`` the token positions those calls processed (every row of a batch, padding included;
a position read from a KV cache is not processed again), ``seconds`` the wall time. Greedy,
sampled, best-of-N and SCoRe run all problems in one batch; RAIN and check-and-correct take one
prompt at a time (their APIs), so their forwards are not comparable with the batched methods'
and their tokens are.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn

from . import task
from .training import answers, context_template, greedy, sampling

METHODS = ("greedy", "sampled", "best-of-n", "rain", "check-and-correct", "score")
CSV_COLUMNS = ("method", "setting", "accuracy", "ci_low", "ci_high", "forwards", "tokens",
               "seconds")


class Row(NamedTuple):
    """One line of evidence.csv."""

    method: str
    setting: str
    accuracy: float
    ci_low: float
    ci_high: float
    forwards: int
    tokens: int
    seconds: float


def wilson(correct: int, total: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``correct / total`` (95 % by default); ``(0, 1)``
    when ``total`` is 0."""
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))  # p inside, exactly


class Cost:
    """What a block cost: decoder forwards, token positions, wall seconds."""

    def __init__(self) -> None:
        self.forwards = 0
        self.tokens = 0
        self.seconds = 0.0

    def _hook(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None and kwargs.get("inputs_embeds") is not None:
            ids = kwargs["inputs_embeds"][..., 0]
        self.forwards += 1
        self.tokens += 0 if ids is None else int(ids.numel())


@contextlib.contextmanager
def counted(*models: nn.Module) -> Iterator[Cost]:
    """Count the decoder forwards of ``models`` and time the block."""
    cost = Cost()
    handles = [m.get_decoder().register_forward_pre_hook(cost._hook, with_kwargs=True)
               for m in dict.fromkeys(models)]
    start = time.perf_counter()
    try:
        yield cost
    finally:
        cost.seconds = time.perf_counter() - start
        for handle in handles:
            handle.remove()


def row(method: str, setting: str, correct: Sequence[bool], cost: Cost) -> Row:
    hits = int(sum(bool(c) for c in correct))
    low, high = wilson(hits, len(correct))
    return Row(method, setting, hits / max(len(correct), 1), low, high, cost.forwards,
               cost.tokens, cost.seconds)


class Setup(NamedTuple):
    """What every method needs: the model (eval mode), its tokenizer, the judge (a
    ``SelfEvaluator``), the held-out problems, the token budgets of an answer and of SCoRe's
    attempts, and the seed."""

    model: nn.Module
    tokenizer: object
    evaluator: object
    problems: list[task.Problem]
    max_new_tokens: int
    retry_tokens: int
    seed: int


def _seeded(setup: Setup, offset: int) -> None:
    torch.manual_seed(setup.seed * 1000 + offset)


# ----------------------------------------------------------------------------- plain decoding


def plain(setup: Setup) -> list[Row]:
    """Greedy decoding, and one sample per problem at temperature 1 (what a best-of-N candidate
    is on its own)."""
    prompts = [p.prompt for p in setup.problems]
    out = []
    for name, sample in (("greedy", False), ("sampled", True)):
        _seeded(setup, 1)
        kwargs = (sampling if sample else greedy)(setup.max_new_tokens)
        with counted(setup.model) as cost:
            texts = answers(setup.model, setup.tokenizer, prompts, **kwargs)
        setting = "temperature=1" if sample else ""
        out.append(row(name, setting, _checked(setup.problems, texts), cost))
    return out


def _checked(problems: Sequence[task.Problem], texts: Sequence[str]) -> list[bool]:
    return [task.is_correct(p, t) for p, t in zip(problems, texts)]


class JudgeCheck(NamedTuple):
    """How the judge rates greedy answers to the held-out problems: the share it gets right
    (score > 0 for a correct answer, <= 0 for a wrong one), its mean score on the correct and on
    the wrong ones (None where there are none)."""

    accuracy: float
    mean_correct: float | None
    mean_wrong: float | None


def judge_check(setup: Setup) -> JudgeCheck:
    """The judge against the checker on the model's greedy answers (a diagnostic, not a row)."""
    prompts = [p.prompt for p in setup.problems]
    texts = answers(setup.model, setup.tokenizer, prompts, **greedy(setup.max_new_tokens))
    right = torch.tensor(_checked(setup.problems, texts))
    scores = setup.evaluator.score(prompts, texts).score.cpu()
    accuracy = float(((scores > 0) == right).float().mean())
    means = [float(scores[mask].mean()) if mask.any() else None for mask in (right, ~right)]
    return JudgeCheck(accuracy, *means)


# ----------------------------------------------------------------------------- best-of-N


def best_of_n_rows(setup: Setup, ns: Sequence[int] = (4, 8, 16)) -> list[Row]:
    """``best_of_n`` on all problems at once, candidates sampled at temperature 1, chosen by
    their likelihood (``score="likelihood"``, the summed log-probability) or by the judge
    (``score="self_eval"``)."""
    from alignkern.loops import best_of_n

    prompts = [p.prompt for p in setup.problems]
    out = []
    for n in ns:
        for score in ("likelihood", "self_eval"):
            _seeded(setup, 100 + n)  # both scorings see the same candidates
            with counted(setup.model) as cost:
                result = best_of_n(setup.model, setup.tokenizer, prompts, n=n, score=score,
                                   evaluator=setup.evaluator,
                                   generation_kwargs=sampling(setup.max_new_tokens))
            out.append(row("best-of-n", f"n={n} {score}", _checked(setup.problems,
                                                                    result.best_candidates), cost))
    return out


# ----------------------------------------------------------------------------- RAIN


def rain_rows(setup: Setup) -> list[Row]:
    """``rain_generate`` with its defaults on each problem (the answer's token budget aside),
    the judge scoring the partial answers as they stand."""
    from alignkern.loops import rain_generate

    _seeded(setup, 200)
    texts = []
    with counted(setup.model) as cost:
        for p in setup.problems:
            result = rain_generate(setup.model, setup.tokenizer, p.prompt, setup.evaluator,
                                   max_new_tokens=setup.max_new_tokens)
            texts.append(result.text)
    return [row("rain", "defaults", _checked(setup.problems, texts), cost)]


# ----------------------------------------------------------------------------- check-and-correct


class Checker:
    """An evaluator for ``check_and_correct`` that is the task's checker, not the model: +1 for a
    correct answer, -1 otherwise (external feedback, the upper bound of a self-check)."""

    def score(self, prompts, responses) -> torch.Tensor:
        responses = [responses] if isinstance(responses, str) else list(responses)
        prompts = [prompts] * len(responses) if isinstance(prompts, str) else list(prompts)
        return torch.tensor([2.0 * r - 1.0 for r in reward(prompts, responses)])


def check_and_correct_rows(setup: Setup, rounds: int = 3, beta: float = 1.0) -> list[Row]:
    """``check_and_correct`` on each problem: ``rounds`` greedy answers, each rewarded, the
    (problem, answer, reward) triplets so far in the context of the next; the answer is the
    round with the highest reward. The reward is the model's self-evaluation (the loop as
    designed) or the checker (``Checker``); each without and with the reward bias
    ``beta * reward`` on the keys of each in-context example."""
    from alignkern.loops import check_and_correct

    out = []
    for source, evaluator in (("self_eval", setup.evaluator), ("checker", Checker())):
        for name, bias in (("off", None), ("on", beta)):
            _seeded(setup, 300)
            finals = []
            with counted(setup.model) as cost:
                for p in setup.problems:
                    result = check_and_correct(
                        setup.model, setup.tokenizer, p.prompt, evaluator, rounds=rounds,
                        template=context_template(), reward_bias=bias,
                        generation_kwargs=greedy(setup.max_new_tokens))
                    finals.append(result.final)
            setting = (f"rounds={rounds} reward={source} reward_bias={name}"
                       + ("" if bias is None else f" beta={beta:g}"))
            out.append(row("check-and-correct", setting, _checked(setup.problems, finals), cost))
    return out


# ----------------------------------------------------------------------------- SCoRe


class StageTwo(NamedTuple):
    """SCoRe's stage II: steps, rollouts per step, learning rate, shaping bonus, KL weight."""

    steps: int = 30
    batch: int = 64
    lr: float = 2e-5
    alpha: float = 10.0
    beta_kl: float = 0.1


def reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """1.0 for a correct answer, else 0.0 (the checker on each prompt's problem)."""
    return [float(task.is_correct(task.parse_problem(p), r)) for p, r in zip(prompts, responses)]


def stage_two(model: nn.Module, tokenizer, training: Iterator[task.Problem], config: StageTwo,
              max_new_tokens: int, log: Callable[[str], None] | None = None) -> nn.Module:
    """A copy of ``model`` trained by SCoRe's stage II: each step samples two-attempt rollouts
    on fresh training problems (``two_attempt_rollout``, temperature 1) and takes an AdamW step
    on ``score_stage2_loss`` against the frozen ``model``. Returns the policy (eval mode)."""
    from alignkern.loops import score_stage2_loss, two_attempt_rollout

    policy = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr, weight_decay=0.0)
    kwargs = sampling(max_new_tokens)
    for s in range(config.steps):
        prompts = [next(training).prompt for _ in range(config.batch)]
        policy.eval()
        rollout = two_attempt_rollout(policy, tokenizer, prompts, reward,
                                      correction_instruction=task.CORRECTION, alpha=config.alpha,
                                      generation_kwargs=kwargs)
        policy.train()
        loss = score_stage2_loss(policy, model, rollout, beta_kl=config.beta_kl)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if log is not None and ((s + 1) % 10 == 0 or s + 1 == config.steps):
            log(f"  SCoRe stage II: step {s + 1}/{config.steps}, loss {loss.item():+.3f}, "
                f"Acc@t1 {rollout.r1.mean():.2f}, Acc@t2 {rollout.r2.mean():.2f}")
    return policy.eval()


def score_rows(setup: Setup, policy: nn.Module, stage: str, *, first: bool = True) -> list[Row]:
    """A model's two attempts on the held-out problems (greedy, one batch each; ``stage`` says
    which model, e.g. "after 30 stage-II steps"): attempt 1 (with ``first``), and attempt 2 with
    Δ(t1, t2) and the fractions of problems fixed (wrong, then right) and broken (right, then
    wrong) in its setting. Attempt 1's cost is that of greedy decoding with the model (the same
    tokens); attempt 2's the whole rollout."""
    from alignkern.loops import two_attempt_rollout

    prompts = [p.prompt for p in setup.problems]
    kwargs = greedy(setup.retry_tokens)
    out = []
    if first:
        with counted(policy) as first_cost:
            texts = answers(policy, setup.tokenizer, prompts, **kwargs)
        out.append(row("score", f"attempt=1 {stage}", _checked(setup.problems, texts),
                       first_cost))
    with counted(policy) as both_cost:
        rollout = two_attempt_rollout(policy, setup.tokenizer, prompts, reward,
                                      correction_instruction=task.CORRECTION,
                                      generation_kwargs=kwargs)
    r1, r2 = rollout.r1.bool(), rollout.r2.bool()
    fixed = float((~r1 & r2).float().mean())
    broken = float((r1 & ~r2).float().mean())
    delta = float(r2.float().mean() - r1.float().mean())
    out.append(row("score", f"attempt=2 {stage} delta={delta:+.3f} fixed={fixed:.3f} "
                            f"broken={broken:.3f}", r2.tolist(), both_cost))
    return out
