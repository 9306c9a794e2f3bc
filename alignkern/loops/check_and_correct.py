"""In-context alignment (Wang et al. 2024, "A Theoretical Understanding of Self-Correction through
In-context Alignment"): answer, check the answer with the model itself, put the (query, response,
reward) triplets of all rounds so far into the context, answer again.

The theory reads one such context as a Plackett–Luce ranking step carried out by attention over
the triplets. Two inference-time knobs expose that mechanism through alignkern's attention
backend: ``reward_bias=beta`` adds ``beta * reward`` to the attention score of every token of
each in-context example, and ``rank_mask=True`` lets each example attend only to examples whose
reward is lower or equal (the reward-ordering mask).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn

import alignkern

from .. import _checks
from ..integrations import transformers as ak_hf
from . import _common


class ContextTemplate(NamedTuple):
    """How the context of a round is written: ``header``, then one ``example`` per earlier round
    (``str.format`` fields ``{query}``, ``{response}``, ``{reward}``, a float), then ``question``
    (field ``{query}``) where the model answers. Each piece is tokenized on its own (the header
    with the tokenizer's special tokens, the others without) and the token ids are concatenated,
    so that each example's tokens are known exactly."""

    header: str = ("Below are earlier answers to the question with the reward each one received. "
                   "Write a better answer.\n\n")
    example: str = "Question: {query}\nAnswer: {response}\nReward: {reward:+.2f}\n\n"
    question: str = "Question: {query}\nAnswer:"


DEFAULT_TEMPLATE = ContextTemplate()
DEFAULT_GENERATION = {"max_new_tokens": 32}


class Context(NamedTuple):
    """One round's context: ``input_ids`` (the concatenated pieces), ``segment_ids`` (``-1`` for
    header and question tokens, ``i`` for the tokens of example ``i``), ``prefix_length`` (the
    header and examples: what the next round shares) and ``text`` (the pieces joined)."""

    input_ids: list[int]
    segment_ids: list[int]
    prefix_length: int
    text: str


class CheckAndCorrect(NamedTuple):
    """What ``check_and_correct`` returns: the response of each round (decoded up to EOS, special
    tokens skipped, whitespace stripped), their rewards ``(rounds,)`` float32, ``final`` the
    highest-reward response (ties: the earliest), and the context text each round answered."""

    responses: list[str]
    rewards: torch.Tensor
    final: str
    contexts: list[str]


def build_context(tokenizer, query: str, responses: list[str], rewards: list[float],
                  template: ContextTemplate = DEFAULT_TEMPLATE) -> Context:
    """The context after ``len(responses)`` rounds (see ``ContextTemplate``)."""
    pieces = [template.header] + [template.example.format(query=query, response=r, reward=w)
                                  for r, w in zip(responses, rewards)]
    question = template.question.format(query=query)
    ids, segments = [], []
    for i, piece in enumerate(pieces + [question]):
        tokens = tokenizer(piece, add_special_tokens=(i == 0))["input_ids"] if piece or i == 0 \
            else []
        ids.extend(tokens)
        segment = i - 1 if 0 < i <= len(responses) else -1
        segments.extend([segment] * len(tokens))
    prefix = len(ids) - len(tokenizer(question, add_special_tokens=False)["input_ids"])
    return Context(ids, segments, prefix, "".join(pieces) + question)


class AttentionInputs(NamedTuple):
    """``(1, L)`` tensors for alignkern's attention: ``key_bias`` or None, ``key_rank`` and
    ``query_rank`` or None."""

    key_bias: torch.Tensor | None
    key_rank: torch.Tensor | None
    query_rank: torch.Tensor | None


def attention_inputs(context: Context, rewards: list[float], reward_bias: float | None,
                     rank_mask: bool, device) -> AttentionInputs:
    """The key bias ``segment_bias(rewards, segment_ids, reward_bias)`` (``beta * reward`` on each
    example's tokens, 0 on header and question) and, with ``rank_mask``, the ranks: an example's
    tokens rank as its reward, the header as ``-inf`` (seen by every token, sees only itself), the
    question and what is generated after it as ``+inf`` (sees everything). Key ``j`` is visible
    to query ``i`` iff ``key_rank_j <= query_rank_i``."""
    segments = torch.tensor([context.segment_ids], dtype=torch.long, device=device)
    values = torch.tensor([rewards], dtype=torch.float32, device=device).reshape(1, -1)
    bias = None if reward_bias is None else alignkern.segment_bias(values, segments, reward_bias)
    if not rank_mask:
        return AttentionInputs(bias, None, None)
    ranks = torch.full(segments.shape, float("inf"), device=device)
    ranks[:, :_header_length(context)] = float("-inf")
    examples = segments >= 0
    ranks[examples] = values[0, segments[examples]]
    return AttentionInputs(bias, ranks, ranks.clone())


def _header_length(context: Context) -> int:
    """Tokens before the first example (or before the question): the leading ``-1`` segment."""
    for i, segment in enumerate(context.segment_ids):
        if segment >= 0:
            return i
    return context.prefix_length


def check_and_correct(
    model: nn.Module,
    tokenizer,
    query: str,
    evaluator,
    *,
    rounds: int = 3,
    template: ContextTemplate | None = None,
    reward_bias: float | None = None,
    rank_mask: bool = False,
    generation_kwargs: dict | None = None,
    reuse_prefix: bool = True,
) -> CheckAndCorrect:
    """The in-context alignment loop, ``rounds`` answers long.

    Round ``t`` (from 0): the context is ``template.header``, the triplets ``(query, response_s,
    reward_s)`` of the rounds ``s < t`` written with ``template.example``, then
    ``template.question``; the model answers with ``generate`` (``generation_kwargs``, default
    ``max_new_tokens=32`` over the model's generation config); ``evaluator.score(query,
    response_t)`` is its reward. The default template::

        Below are earlier answers to the question with the reward each one received. Write a
        better answer.

        Question: {query}
        Answer: {response}
        Reward: {reward:+.2f}

        ...
        Question: {query}
        Answer:

    The header and examples are shared by the next round: their KV cache is kept and extended
    by one example per round (``reuse_prefix=False`` recomputes every context, for comparison).

    With ``reward_bias=beta`` (a number) or ``rank_mask=True`` the answers are generated on
    alignkern's attention backend (``register()``; the model's attention implementation is
    switched for the generation and restored), with ``segment_bias(rewards, segment_ids, beta)``
    as the key bias and, with ``rank_mask``, the ranks of ``attention_inputs``. Tokens generated
    after the question get no bias and rank ``+inf``. ``reward_bias=0`` is bit for bit the
    unbiased run on that backend (``reward_bias=None`` with a model loaded with
    ``attn_implementation="alignkern"``); ``None`` runs the model as it is.

    Args:
        model, tokenizer: a transformers causal LM and its tokenizer.
        query: the question.
        evaluator: a ``SelfEvaluator`` (options single tokens; its judge prefix is kept across
            the rounds, ``reusing_prefix_across_calls()``, and dropped at the end) or any object
            whose ``score(query, [response])`` returns one score.
        rounds: answers to generate, >= 1.
        template: a ``ContextTemplate``; default ``DEFAULT_TEMPLATE``.
        reward_bias: ``beta``, a finite number, or None.
        rank_mask: add the reward-ordering mask.
        generation_kwargs: passed to ``generate``.
        reuse_prefix: keep the shared prefix's KV cache between rounds.

    Returns:
        ``CheckAndCorrect(responses, rewards (rounds,), final, contexts)``.

    Raises:
        TypeError / ValueError naming the argument: ``rounds`` not an int >= 1, a non-str query,
        a template that is not a ``ContextTemplate`` or whose question is empty, a non-finite
        ``reward_bias``, a non-bool ``rank_mask``, an evaluator whose options are not single
        tokens, generation arguments that collide with the loop's.
    """
    fn = "check_and_correct"
    _common.text(fn, "query", query)
    _common.check_evaluator(fn, evaluator, tokenizer)
    rounds = _common.positive_int(fn, "rounds", rounds)
    template = _check_template(fn, template, tokenizer, query)
    reward_bias = _checks.real(fn, "reward_bias", reward_bias, optional=True)
    rank_mask = _checks.boolean(fn, "rank_mask", rank_mask)
    reuse_prefix = _checks.boolean(fn, "reuse_prefix", reuse_prefix)
    kwargs = _common.generation_kwargs(
        fn, generation_kwargs, defaults=DEFAULT_GENERATION,
        reserved=("input_ids", "attention_mask", "return_dict_in_generate", "cache",
                  "past_key_values", "num_return_sequences"))
    on_alignkern = reward_bias is not None or rank_mask
    runner = _Rounds(model, tokenizer, kwargs, reward_bias, rank_mask, reuse_prefix)
    responses, rewards, contexts = [], [], []
    with _common.prefix_kept_for_the_loop(evaluator):
        for _ in range(rounds):
            context = build_context(tokenizer, query, responses, rewards, template)
            with _alignkern_attention(model, on_alignkern):
                response = runner.answer(context, rewards)
            responses.append(response)
            contexts.append(context.text)
            score = evaluator.score(query, [response])
            rewards.append(float(_common.scores_of(fn, score, 1)[0]))
    values = torch.tensor(rewards, dtype=torch.float32)
    best = int(torch.nan_to_num(values, nan=float("-inf")).argmax())
    return CheckAndCorrect(responses, values, responses[best], contexts)


def _check_template(fn: str, template, tokenizer, query: str) -> ContextTemplate:
    if template is None:
        return DEFAULT_TEMPLATE
    if not isinstance(template, ContextTemplate):
        raise TypeError(f"{fn}: template must be an alignkern.loops.ContextTemplate, got "
                        f"{_checks.describe(template)}")
    for name in ContextTemplate._fields:
        _common.text(fn, f"template.{name}", getattr(template, name))
    try:
        template.example.format(query=query, response="", reward=0.0)
        question = template.question.format(query=query)
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"{fn}: template.example may use {{query}}, {{response}} and {{reward}}, "
                         f"template.question {{query}}: {error!r}") from None
    if not tokenizer(question, add_special_tokens=False)["input_ids"]:
        raise ValueError(f"{fn}: template.question must give at least one token (the model "
                         "answers after it)")
    return template


@contextlib.contextmanager
def _alignkern_attention(model: nn.Module, active: bool) -> Iterator[None]:
    """Run the model on alignkern's attention backend inside the block (when ``active``),
    restoring its attention implementation afterwards."""
    before = model.config._attn_implementation
    if not active or before == ak_hf.register():
        yield
        return
    model.set_attn_implementation(ak_hf.register())
    try:
        yield
    finally:
        model.set_attn_implementation(before)


class _Rounds:
    """Generates each round's answer, keeping the KV cache of the shared prefix."""

    def __init__(self, model, tokenizer, kwargs, reward_bias, rank_mask, reuse_prefix):
        self.model, self.tokenizer, self.kwargs = model, tokenizer, kwargs
        self.reward_bias, self.rank_mask, self.reuse = reward_bias, rank_mask, reuse_prefix
        self.device = _common.model_device(model)
        self.pad = _common.pad_id(tokenizer, model)
        self.eos = _common.eos_ids(model, tokenizer, kwargs)
        self.cache, self.cached = None, 0  # the cache covers the first `cached` context tokens

    def answer(self, context: Context, rewards: list[float]) -> str:
        extras = attention_inputs(context, rewards, self.reward_bias, self.rank_mask, self.device)
        self._extend_prefix(context, extras)
        ids = torch.tensor([context.input_ids], dtype=torch.long, device=self.device)
        prefix = self.cache if self.cached else None
        bias = ak_hf.attention_bias(**extras._asdict()) if any(x is not None for x in extras) \
            else contextlib.nullcontext()
        with bias, _common.continuing(self.model, prefix, 1) as cache:
            out = _common.generate(self.model, ids, torch.ones_like(ids), self.kwargs,
                                   pad=self.pad, **cache)
        return _common.decode_generated(self.tokenizer, out.sequences[:, ids.shape[1]:],
                                        self.eos)[0].strip()

    def _extend_prefix(self, context: Context, extras: AttentionInputs) -> None:
        """Extend the cache over the context's prefix (header and examples), run with the same
        bias and ranks as the generation."""
        end = context.prefix_length
        if not self.reuse or end <= self.cached:
            return
        forward = {}
        for name, value in zip(("alignkern_key_bias", "alignkern_key_rank",
                                "alignkern_query_rank"), extras):
            if value is not None:
                forward[name] = value[:, :end]
        self.cache = _common.extend_cache(self.model, self.cache,
                                          context.input_ids[self.cached:end], self.device,
                                          **forward)
        self.reuse = self.cache is not None  # a cache that cannot be copied: recompute
        self.cached = end if self.reuse else 0
