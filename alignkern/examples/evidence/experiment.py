"""The whole run: train (or load) the model, then every method on the same held-out problems."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from . import methods, task, training
from .methods import Row, StageTwo
from .training import TrainConfig


class Config(NamedTuple):
    """The model's training, the held-out problems, each loop's settings."""

    train: TrainConfig = TrainConfig()
    problems: int = 200          # held-out problems every method answers
    ns: tuple[int, ...] = (4, 8, 16)
    rounds: int = 3              # check-and-correct's answers per problem
    beta: float = 1.0            # check-and-correct's reward bias on the keys, when on
    stage_two: StageTwo = StageTwo()


FULL = Config()
QUICK = Config(train=TrainConfig(digits=1, hidden=32, layers=2, answer_steps=150, mixed_steps=60,
                                 refresh=30, pool_problems=32, batch=32),
               problems=12, ns=(4, 8, 16), stage_two=StageTwo(steps=3, batch=8))


class Result(NamedTuple):
    """The rows of evidence.csv, the training's wall seconds per stage (empty for a loaded
    model), and a description of the model."""

    rows: list[Row]
    train_seconds: dict[str, float]
    description: str


def load(path: str) -> tuple[nn.Module, object]:
    """A local transformers causal LM and its tokenizer (left padding), eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def describe(model: nn.Module) -> str:
    config = model.config
    parameters = sum(p.numel() for p in model.parameters())
    return (f"{type(model).__name__}: {config.num_hidden_layers} layers, hidden "
            f"{config.hidden_size}, vocabulary {config.vocab_size}, {parameters:,} parameters")


def run(config: Config = FULL, *, seed: int = 0, model: nn.Module | None = None, tokenizer=None,
        save_model: str | None = None, log: Callable[[str], None] | None = None) -> Result:
    """Train a model on the task (or take ``model`` and ``tokenizer``, e.g. from ``load``;
    ``save_model``: a folder to save the trained one in), then run every method on
    ``config.problems`` held-out problems; seeded from ``seed`` (the global RNG is restored)."""
    log = log or (lambda _: None)
    digits = config.train.digits
    problems = task.held_out(config.problems, digits, seed)
    with torch.random.fork_rng():
        if model is None:
            log(f"training the model on the CPU ({torch.get_num_threads()} thread(s)):")
            trained = training.train(config.train, problems, seed, log=log)
            model, tokenizer, seconds = trained.model, task.tokenizer(), trained.seconds
            log(f"trained in {sum(seconds.values()):.1f} s ("
                + ", ".join(f"{stage} {value:.1f} s" for stage, value in seconds.items()) + ")")
            if save_model is not None:
                model.save_pretrained(save_model)
                tokenizer.save_pretrained(save_model)
        else:
            seconds = {}
        description = describe(model)
        log(description)
        setup = methods.Setup(model, tokenizer, training.judge(model, tokenizer), problems,
                              training.max_answer_tokens(digits),
                              training.max_retry_tokens(digits), seed)
        check = methods.judge_check(setup)
        log(f"the judge on the model's greedy answers: agrees with the checker on "
            f"{check.accuracy:.1%}; mean score {_mean(check.mean_correct)} on correct answers, "
            f"{_mean(check.mean_wrong)} on wrong ones")
        rows = []
        for name, fn in (("greedy and sampled decoding", methods.plain),
                         ("best-of-n", lambda s: methods.best_of_n_rows(s, config.ns)),
                         ("rain", methods.rain_rows),
                         ("check-and-correct", lambda s: methods.check_and_correct_rows(
                             s, config.rounds, config.beta)),
                         ("score", lambda s: _score(s, config, seed, log))):
            start = time.perf_counter()
            found = fn(setup)
            rows += found
            log(f"{name}: {time.perf_counter() - start:.1f} s, accuracy "
                + ", ".join(f"{r.accuracy:.3f}" for r in found))
    return Result(rows, seconds, description)


def _mean(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


def _score(setup: methods.Setup, config: Config, seed: int, log) -> list[Row]:
    """SCoRe: the second attempt of the model as trained (its first is the greedy row), then
    the stage-II run on fresh training problems and both attempts of its policy on the held-out
    problems."""
    rows = methods.score_rows(setup, setup.model, "before stage II", first=False)
    torch.manual_seed(seed * 1000 + 400)
    stream = task.training_stream(config.train.digits, seed + 1, setup.problems)
    start = time.perf_counter()
    policy = methods.stage_two(setup.model, setup.tokenizer, stream, config.stage_two,
                               setup.retry_tokens, log=log)
    log(f"  SCoRe stage II trained in {time.perf_counter() - start:.1f} s")
    return rows + methods.score_rows(setup, policy,
                                     f"after {config.stage_two.steps} stage-II steps")
