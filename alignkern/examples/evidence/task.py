"""The task: multi-digit addition written as text, the sum's digits reversed (least significant
first, the order in which a carry is computed), then a full stop; and its character tokenizer.

    prompt   "57+968="        answer "5201."      (57 + 968 = 1025)

A program checks an answer exactly (``is_correct``); the model's self-evaluation is trained to
make the same judgement. Every text the loops need is written here: the judge's template, the
in-context correction template, SCoRe's correction instruction.
"""

from __future__ import annotations

import functools
import random
import string
from collections.abc import Iterator, Sequence
from typing import NamedTuple

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")
# Every printable character but the rare whitespace ones: one token each.
CHARACTERS = tuple(c for c in string.printable if c not in "\t\r\x0b\x0c")
VOCAB = len(SPECIAL) + len(CHARACTERS)

# The judge (a ``SelfEvaluator``): the problem, the candidate, the two meanings listed in both
# orders (RAIN's option swap: "(A) yes (B) no", then "(A) no (B) yes"), the answer read at
# "Answer: (".
JUDGE_TEMPLATE = "{prompt}{response}\nIs it right? {options}\nAnswer: ("
JUDGE_OPTIONS = ("A", "B")
JUDGE_DESCRIPTIONS = ("yes", "no")

# check_and_correct's context: no header (round 0 sees exactly the plain prompt), one line per
# earlier round with the self-evaluation as its reward, then the problem again.
CONTEXT_HEADER = ""
CONTEXT_EXAMPLE = "{query}{response} reward {reward:+.2f}\n"
CONTEXT_QUESTION = "{query}"

# SCoRe's instruction between the first attempt and the second; the second attempt writes the
# problem again before its answer ("57+968=5201."), so that the answer follows the problem as in
# the first attempt.
CORRECTION = "\nCheck it and write it again:\n"


class Problem(NamedTuple):
    """``a + b``."""

    a: int
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}+{self.b}="

    @property
    def answer(self) -> str:
        return str(self.a + self.b)[::-1] + "."


def is_correct(problem: Problem, response: str) -> bool:
    """Whether ``response`` (surrounding whitespace ignored) is exactly the answer, or the
    problem written again and then the answer (as a second attempt writes it)."""
    response = response.strip()
    return response in (problem.answer, problem.prompt + problem.answer)


def parse_problem(prompt: str) -> Problem:
    """The problem a prompt ``"a+b="`` states (ValueError for any other text)."""
    left, sep, rest = prompt.partition("+")
    right, eq, tail = rest.partition("=")
    if not (sep and eq and not tail and left.isdigit() and right.isdigit()):
        raise ValueError(f"parse_problem: expected a prompt 'a+b=' with decimal a and b, got "
                         f"{prompt!r}")
    return Problem(int(left), int(right))


def sample_problem(rng: random.Random, digits: int) -> Problem:
    """Each operand: a length of 1 to ``digits`` digits drawn uniformly, then a number of that
    many digits (so that short operands are as common as long ones)."""
    def operand() -> int:
        length = rng.randint(1, digits)
        return rng.randrange(10 ** (length - 1) if length > 1 else 0, 10 ** length)
    return Problem(operand(), operand())


def held_out(count: int, digits: int, seed: int) -> list[Problem]:
    """``count`` distinct problems for evaluation, drawn from their own seeded stream."""
    rng = random.Random(f"evidence-test-{seed}")
    seen: dict[Problem, None] = {}
    while len(seen) < count:
        seen.setdefault(sample_problem(rng, digits))
    return list(seen)


def training_stream(digits: int, seed: int, exclude: Sequence[Problem]) -> Iterator[Problem]:
    """An endless seeded stream of training problems, never one of ``exclude`` (the held-out
    problems)."""
    rng = random.Random(f"evidence-train-{seed}")
    excluded = set(exclude)
    while True:
        problem = sample_problem(rng, digits)
        if problem not in excluded:
            yield problem


@functools.cache
def tokenizer():
    """A character-level ``PreTrainedTokenizerFast``: ``<pad>`` 0, ``<s>`` 1 (prepended), ``</s>``
    2, ``<unk>`` 3, then one token per printable character. Built here, nothing downloaded;
    cached (every call returns the same object, left padding)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + CHARACTERS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", padding_side="left")
