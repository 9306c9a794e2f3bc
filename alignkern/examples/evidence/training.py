"""The model and its training, all on the CPU in this process.

A small ``LlamaForCausalLM`` built from a config learns, by next-token cross-entropy on the
target tokens only:

1. *answers* (stage 1): ``<s>57+968=`` -> ``5201.</s>``; stopped early on purpose, so that the
   model is right about half the time and the loops have room to help;
2. then (stage 2) answers mixed with three kinds of examples made from the model's **own
   outputs**, re-sampled every ``refresh`` steps from the current model (its greedy answer and
   ``samples`` answers sampled at temperature 1, on training problems):

   * the *judgement* "is it right?" on the judge's template (a ``SelfEvaluator``'s texts, both
     listing orders of "(A) yes / (B) no"), the label from the checker; half the examples are
     the right answer and half its own wrong ones, so that the problem alone never tells;
   * *in-context correction*: check_and_correct's context (``build_context``) of one or two of
     its own answers with rewards, the target the right answer; the rewards are the judge's own
     scores of the answers half of the time, the checker's verdict (a sign, with a random size)
     the other half;
   * *a second attempt*: the prompt, its own first attempt (greedy or sampled, as SCoRe's
     evaluation and training see them), SCoRe's correction instruction, the target the problem
     written again and the right answer (SCoRe's stage I supervises the second attempt
     similarly).

Nothing here looks at the held-out problems (``task.training_stream`` excludes them).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn

from . import task

IGNORE = -100


class TrainConfig(NamedTuple):
    """The model's size and its training."""

    digits: int = 3
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    answer_steps: int = 1000     # stage 1: answers only
    mixed_steps: int = 800       # stage 2: answers, judgements, corrections on its own outputs
    batch: int = 64
    lr: float = 3e-3
    refresh: int = 100           # stage 2 re-samples its own outputs every this many steps
    pool_problems: int = 128     # training problems per re-sampling
    samples: int = 3             # sampled answers per problem (besides the greedy one)
    mix: tuple[int, ...] = (1, 1, 2, 2)  # answers, judgements, corrections, second attempts


class Example(NamedTuple):
    """Token ids and their labels (``IGNORE`` except on the target tokens)."""

    ids: list[int]
    labels: list[int]


def build_model(config: TrainConfig, seed: int):
    """A fresh ``LlamaForCausalLM`` (character vocabulary, tied embeddings, SDPA attention),
    seeded."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    llama = LlamaConfig(vocab_size=task.VOCAB, hidden_size=config.hidden,
                        num_hidden_layers=config.layers, num_attention_heads=config.heads,
                        num_key_value_heads=config.heads, intermediate_size=2 * config.hidden,
                        max_position_embeddings=512, pad_token_id=task.PAD,
                        bos_token_id=task.BOS, eos_token_id=task.EOS, tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(llama, attn_implementation="sdpa")
    model.generation_config.pad_token_id = task.PAD
    model.generation_config.do_sample = False
    return model.eval()


# ----------------------------------------------------------------------------- examples


def _target(tokenizer, context: list[int], target: str) -> Example:
    tokens = tokenizer(target, add_special_tokens=False)["input_ids"] + [task.EOS]
    return Example(context + tokens, [IGNORE] * len(context) + tokens)


def answer_example(tokenizer, problem: task.Problem) -> Example:
    """``<s>a+b=`` then the answer and ``</s>``."""
    return _target(tokenizer, tokenizer(problem.prompt)["input_ids"], problem.answer)


def judge_example(tokenizer, evaluator, problem: task.Problem, response: str,
                  order: int) -> Example:
    """The judge's text for ``response`` in listing ``order`` (0: "(A) yes", 1: "(A) no"),
    labelled with the letter listed next to the true judgement (``task.is_correct``)."""
    text = evaluator.texts([problem.prompt], [response])[order][0]
    meaning = 0 if task.is_correct(problem, response) else 1  # index into JUDGE_DESCRIPTIONS
    letter = task.JUDGE_OPTIONS[meaning if order == 0 else 1 - meaning]
    ids = tokenizer(text)["input_ids"]
    target = int(evaluator.option_ids[task.JUDGE_OPTIONS.index(letter)])
    return Example(ids + [target], [IGNORE] * len(ids) + [target])


def correction_example(tokenizer, problem: task.Problem, responses: Sequence[str],
                       rewards: Sequence[float]) -> Example:
    """check_and_correct's context after ``responses`` (rewarded ``rewards``), the answer as
    target."""
    from alignkern.loops import build_context

    context = build_context(tokenizer, problem.prompt, list(responses), list(rewards),
                            context_template())
    return _target(tokenizer, list(context.input_ids), problem.answer)


def retry_example(tokenizer, problem: task.Problem, first: str) -> Example:
    """SCoRe's second-attempt context (prompt, first attempt, correction instruction), the
    problem written again and the answer as target."""
    ids = tokenizer(problem.prompt)["input_ids"] + \
        tokenizer(first, add_special_tokens=False)["input_ids"] + \
        tokenizer(task.CORRECTION, add_special_tokens=False)["input_ids"]
    return _target(tokenizer, ids, problem.prompt + problem.answer)


def context_template():
    from alignkern.loops import ContextTemplate

    return ContextTemplate(header=task.CONTEXT_HEADER, example=task.CONTEXT_EXAMPLE,
                           question=task.CONTEXT_QUESTION)


def judge(model, tokenizer):
    """The model's self-evaluation: a ``SelfEvaluator`` on ``task.JUDGE_TEMPLATE``, score
    ``p(yes) - p(no)`` averaged over both listing orders (RAIN's option swap)."""
    from alignkern.integrations.transformers import SelfEvaluator

    return SelfEvaluator(model, tokenizer, task.JUDGE_TEMPLATE, options=task.JUDGE_OPTIONS,
                         descriptions=task.JUDGE_DESCRIPTIONS, option_separator=" ",
                         batch_size=512)


def collate(examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, labels)`` ``(B, T)``, right-padded."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), task.PAD, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
        mask[i, :len(e.ids)] = 1
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
    return ids, mask, labels


def loss_on(model: nn.Module, examples: Sequence[Example]) -> torch.Tensor:
    """Cross-entropy of each example's target tokens (their mean), averaged over the examples:
    a one-token judgement weighs as much as a whole answer."""
    ids, mask, labels = collate(examples)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    targets = labels[:, 1:]
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets,
                                                  ignore_index=IGNORE, reduction="none")
    counted = (targets != IGNORE).sum(1).clamp(min=1)
    return (per_token.sum(1) / counted).mean()


# ----------------------------------------------------------------------------- own outputs


class OwnOutput(NamedTuple):
    """A training problem, the model's greedy answer and its sampled ones (stripped), and the
    judge's score of each (greedy first)."""

    problem: task.Problem
    greedy: str
    sampled: list[str]
    scores: list[float]


def answers(model, tokenizer, prompts: Sequence[str], **generation_kwargs) -> list[str]:
    """One batched ``generate`` from the prompts (left-padded; ``generation_kwargs`` such as
    ``do_sample``, ``max_new_tokens``, ``num_return_sequences``): each answer up to its EOS,
    stripped."""
    batch = tokenizer(list(prompts), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **generation_kwargs)
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [t.strip() for t in texts]


def sampling(max_new_tokens: int) -> dict:
    """Sampling at temperature 1 from the whole distribution (no top-k or top-p cut)."""
    return {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
            "max_new_tokens": max_new_tokens}


def greedy(max_new_tokens: int) -> dict:
    return {"do_sample": False, "max_new_tokens": max_new_tokens}


def own_outputs(model, tokenizer, evaluator, problems: Sequence[task.Problem], samples: int,
                digits: int) -> list[OwnOutput]:
    """The current model's greedy and sampled answers to ``problems`` and the judge's scores."""
    prompts = [p.prompt for p in problems]
    new = max_answer_tokens(digits)
    first = answers(model, tokenizer, prompts, **greedy(new))
    sampled = answers(model, tokenizer, prompts, num_return_sequences=samples, **sampling(new))
    flat = [r for i in range(len(problems)) for r in [first[i], *sampled[i * samples:
                                                                         (i + 1) * samples]]]
    scores = evaluator.score([p for p in prompts for _ in range(samples + 1)], flat).score.tolist()
    k = samples + 1
    return [OwnOutput(p, first[i], sampled[i * samples:(i + 1) * samples],
                      scores[i * k:(i + 1) * k]) for i, p in enumerate(problems)]


def max_answer_tokens(digits: int) -> int:
    """Room for the longest answer (``digits + 1`` digits and the full stop) and its EOS, plus
    two tokens for a model that runs on."""
    return digits + 4


def max_retry_tokens(digits: int) -> int:
    """Room for a second attempt: the problem written again (``2 digits + 2`` characters) and
    the answer."""
    return 2 * digits + 2 + max_answer_tokens(digits)


def mixed_examples(tokenizer, evaluator, rng: random.Random, pool: Sequence[OwnOutput],
                   fresh: Iterator[task.Problem], count: int,
                   mix: Sequence[int] = (1, 1, 1, 1)) -> list[Example]:
    """``count`` examples of four kinds in the proportions ``mix`` (answers on fresh problems;
    judgements, corrections and second attempts on the model's own outputs)."""
    kinds = [k for k, weight in enumerate(mix) for _ in range(weight)]
    out = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        if kind == 0:
            out.append(answer_example(tokenizer, next(fresh)))
            continue
        own = rng.choice(pool)
        responses = [own.greedy, *own.sampled]
        if kind == 1:
            response = judged_response(rng, own, responses)
            out.append(judge_example(tokenizer, evaluator, own.problem, response,
                                     rng.randrange(2)))
        elif kind == 2:  # round 1 sees the greedy answer; round 2 also a later one
            shown = [0] if rng.random() < 0.5 else [0, rng.randrange(1, len(responses))]
            checked = rng.random() < 0.5
            rewards = [checker_reward(rng, own.problem, responses[j]) if checked
                       else own.scores[j] for j in shown]
            out.append(correction_example(tokenizer, own.problem, [responses[j] for j in shown],
                                          rewards))
        else:
            first = own.greedy if rng.random() < 0.5 else rng.choice(own.sampled)
            out.append(retry_example(tokenizer, own.problem, first))
    return out


def judged_response(rng: random.Random, own: OwnOutput, responses: Sequence[str]) -> str:
    """A response for the judge to learn from, right or wrong with equal odds for every problem
    (so that the problem alone never predicts the label): the answer, or one of the model's own
    wrong answers (a random digit of the answer changed when it made none)."""
    if rng.random() < 0.5:
        return own.problem.answer
    wrong = [r for r in responses if not task.is_correct(own.problem, r)]
    return rng.choice(wrong) if wrong else _one_digit_changed(rng, own.problem.answer)


def checker_reward(rng: random.Random, problem: task.Problem, response: str) -> float:
    """A reward whose sign is the checker's verdict and whose size is drawn from U(0.2, 1), so
    that the in-context rewards the model learns from range over what a judge writes."""
    sign = 1.0 if task.is_correct(problem, response) else -1.0
    return sign * rng.uniform(0.2, 1.0)


def _one_digit_changed(rng: random.Random, answer: str) -> str:
    i = rng.randrange(len(answer) - 1)  # a digit, not the full stop
    digit = rng.choice([d for d in "0123456789" if d != answer[i]])
    return answer[:i] + digit + answer[i + 1:]


# ----------------------------------------------------------------------------- training


class Trained(NamedTuple):
    """What ``train`` returns: the model (eval mode), the loss at each step, the wall seconds of
    each stage."""

    model: nn.Module
    losses: list[float]
    seconds: dict[str, float]


def _optimizer(model: nn.Module, lr: float, steps: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    steps = max(1, steps)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) *
        0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    return optimizer, schedule


def step(model: nn.Module, optimizer, examples: Sequence[Example]) -> float:
    """One AdamW step on ``examples``; returns the loss before it."""
    model.train()
    loss = loss_on(model, examples)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    model.eval()
    return loss.item()


def train(config: TrainConfig, held_out: Sequence[task.Problem], seed: int,
          log: Callable[[str], None] | None = None) -> Trained:
    """Both stages from a fresh model; seeded (global RNG state is restored afterwards)."""
    log = log or (lambda _: None)
    tokenizer = task.tokenizer()
    model = build_model(config, seed)
    stream = task.training_stream(config.digits, seed, held_out)
    rng = random.Random(f"evidence-mix-{seed}")
    losses: list[float] = []
    seconds = {}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        start = time.perf_counter()
        optimizer, schedule = _optimizer(model, config.lr, config.answer_steps)
        for s in range(config.answer_steps):
            losses.append(step(model, optimizer,
                               [answer_example(tokenizer, next(stream))
                                for _ in range(config.batch)]))
            schedule.step()
            _progress(log, "answers", s, config.answer_steps, losses)
        seconds["answers"] = time.perf_counter() - start
        start = time.perf_counter()
        evaluator = judge(model, tokenizer)
        optimizer, schedule = _optimizer(model, config.lr, config.mixed_steps)
        pool: list[OwnOutput] = []
        for s in range(config.mixed_steps):
            if s % config.refresh == 0:
                pool = own_outputs(model, tokenizer, evaluator,
                                   [next(stream) for _ in range(config.pool_problems)],
                                   config.samples, config.digits)
            losses.append(step(model, optimizer, mixed_examples(tokenizer, evaluator, rng, pool,
                                                                stream, config.batch,
                                                                config.mix)))
            schedule.step()
            _progress(log, "own outputs", s, config.mixed_steps, losses)
        seconds["own outputs"] = time.perf_counter() - start
    return Trained(model.eval(), losses, seconds)


def _progress(log, stage: str, s: int, steps: int, losses: list[float], every: int = 100) -> None:
    if (s + 1) % every == 0 or s + 1 == steps:
        recent = losses[-min(every, s + 1):]
        log(f"  {stage}: step {s + 1}/{steps}, loss {sum(recent) / len(recent):.3f}")
