"""Shared by the loop tests (no tests here): the package's tiny model and tokenizer, and a
scripted evaluator."""

from __future__ import annotations

import functools

import torch

import alignkern
from alignkern.loops.tiny import tiny_model, tiny_tokenizer

PROMPT = "Human: Can a cat fly?\nAssistant:"


@functools.cache
def model(seed: int = 0, attn_implementation: str | None = None):
    """Shared, read-only: tests that train or change a model build their own."""
    return tiny_model(seed=seed, attn_implementation=attn_implementation)


def tokenizer():
    return tiny_tokenizer()


class Scripted:
    """An evaluator with known scores: each ``score`` call takes the next batch of ``script`` (a
    list of lists; missing values are ``constant``) or, with ``by_text``, calls it per response.
    Records every call's responses. Has no ``options``/``template``, so nothing is checked."""

    def __init__(self, script=None, constant: float = 0.0, by_text=None):
        self.script = [list(batch) for batch in (script or [])]
        self.constant, self.by_text = constant, by_text
        self.calls: list[list[str]] = []
        self.prompts: list[list[str]] = []

    def score(self, prompts, responses):
        responses = [responses] if isinstance(responses, str) else list(responses)
        prompts = [prompts] * len(responses) if isinstance(prompts, str) else list(prompts)
        self.calls.append(responses)
        self.prompts.append(prompts)
        if self.by_text is not None:
            values = [self.by_text(r) for r in responses]
        else:
            batch = self.script.pop(0) if self.script else []
            values = (batch + [self.constant] * len(responses))[:len(responses)]
        scores = torch.tensor(values, dtype=torch.float32)
        return alignkern.SelfEvalScores(scores, torch.ones_like(scores))


class MultiTokenOptions(Scripted):
    """A scripted evaluator that declares a template and options, one of them two tokens long."""

    template = "{prompt} {response} Is it harmless? {options} Answer: ("
    options = ("A", "harmless answer")
