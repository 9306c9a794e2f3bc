"""RAIN / P(True) / G-Eval self-evaluation with a transformers causal LM: ``SelfEvaluator``.

The model reads a template filled with a prompt and a candidate response and answers with one of
K option tokens; the score is the expected value of the answer under the probabilities
renormalised over the options (``alignkern.self_eval_scores``), read from the last hidden state
through the fused LM head, so no logits are built.

Two things make it cheap: every candidate (and both option orders) is scored in one batched
forward, and the template's shared prefix (the text before its first placeholder: instructions,
few-shot examples) runs through the model once per ``score`` call; its KV cache is copied for each
batch and the candidates run on top of it. Across calls the prefix is recomputed unless the caller
opts in (``reuse_prefix_across_calls=True`` or ``with evaluator.reusing_prefix_across_calls():``),
promising that the model's weights and buffers do not change meanwhile: no cheap check sees every
in-place change (``p.data.copy_``, a buffer, a PEFT adapter switch), and a stale cache would give
silently wrong scores.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import string
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

import alignkern
from alignkern import _checks

from .head import LMHead, model_head
from .scoring import positions_from_mask
from .shared_prefix import continuation_cache

_FIELDS = ("prompt", "response", "options")
_NAME = "SelfEvaluator"
SCORE_RULES = ("expected", "rain_vote")


def _template_parts(template: str) -> tuple[set[str], str, str]:
    """The fields of ``template`` and its literal text before the first / after the last field."""
    if not isinstance(template, str):
        raise TypeError(f"SelfEvaluator: template must be a str, got {type(template).__name__}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ValueError(f"SelfEvaluator: template is not a valid format string: {error}") from None
    fields = [name for _, name, _, _ in parsed if name is not None]
    unknown = sorted({name for name in fields if name not in _FIELDS})
    if unknown:
        raise ValueError(f"SelfEvaluator: template may only use the fields {{prompt}}, {{response}} "
                         f"and {{options}}, got {', '.join('{' + f + '}' for f in unknown)}")
    for required in ("prompt", "response"):
        if required not in fields:
            raise ValueError(f"SelfEvaluator: template must contain {{{required}}}")
    head = parsed[0][0] if parsed[0][1] is not None else ""
    last_field = max(i for i, part in enumerate(parsed) if part[1] is not None)
    tail = "".join(part[0] for part in parsed[last_field + 1:])
    return set(fields), head, tail


def _option_token_id(tokenizer, option: str, context: str) -> int:
    """The single token id that ``option`` is when it follows ``context`` (the template's end)."""
    before = tokenizer.encode(context, add_special_tokens=False)
    after = tokenizer.encode(context + option, add_special_tokens=False)
    if len(after) == len(before) + 1 and after[:len(before)] == before:
        return after[-1]
    tokens = tokenizer.convert_ids_to_tokens(after[len(before):] if after[:len(before)] == before
                                             else after)
    raise ValueError(
        f"SelfEvaluator: option {option!r} is not a single token after the template's ending "
        f"{context[-30:]!r} (it tokenizes as {tokens}); choose options that are one token there, "
        "e.g. with a leading space if the template ends without one"
    )


def _distinct_strings(arg: str, value) -> tuple[str, ...]:
    """A non-empty sequence of distinct str (a str itself is refused: it would split into
    characters)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{_NAME}: {arg} must be a sequence of str, got "
                        f"{_checks.describe(value)}")
    items = tuple(value)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise TypeError(f"{_NAME}: {arg}[{i}] must be a str, got {_checks.describe(item)}")
    if not items:
        raise ValueError(f"{_NAME}: {arg} must not be empty, got {items}")
    if len(set(items)) != len(items):
        raise ValueError(f"{_NAME}: {arg} must be distinct (two equal ones can never be told "
                         f"apart, so the score would not depend on the answer), got {items}")
    return items


def _check_values(values, k: int) -> torch.Tensor:
    """``(K,)`` finite float32 values, one per option; ``(+1, -1)`` by default for K = 2."""
    if values is None:
        if k != 2:
            raise ValueError(f"{_NAME}: values must be given for {k} options (the default "
                             "(+1, -1) is for two)")
        return torch.tensor([1.0, -1.0])
    if isinstance(values, torch.Tensor):
        if values.dtype == torch.bool or values.is_complex():
            raise TypeError(f"{_NAME}: values must be real numbers, got {_checks.describe(values)}")
        if values.dim() != 1:
            raise ValueError(f"{_NAME}: values must be 1-D, one value per option ({k},), got "
                             f"shape {tuple(values.shape)}")
        values = values.detach().to("cpu", torch.float32)
    else:
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise TypeError(f"{_NAME}: values must be a sequence of {k} real numbers or a tensor, "
                            f"got {_checks.describe(values)}")
        values = list(values)
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"{_NAME}: values[{i}] must be a real number, got "
                                f"{_checks.describe(v)}")
        values = torch.tensor([float(v) for v in values], dtype=torch.float32)
    if values.shape[0] != k:
        raise ValueError(f"{_NAME}: values must give one value per option ({k}), got "
                         f"{values.shape[0]}")
    if not torch.isfinite(values).all():
        raise ValueError(f"{_NAME}: values must be finite, got {values.tolist()}")
    return values


def _optional_str(arg: str, value, default: str) -> str:
    if value is None:
        return default
    if not isinstance(value, str):
        raise TypeError(f"{_NAME}: {arg} must be None or a str, got {_checks.describe(value)}")
    return value


def _check_option_format(option_format, described: bool) -> str:
    """A format string with ``{option}``, and ``{description}`` exactly when there are
    descriptions (else a listed option would lack its label, or the format would fail at the
    first ``score``)."""
    option_format = _optional_str("option_format", option_format, "")
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(option_format)
                  if name is not None}
    except ValueError as error:
        raise ValueError(f"{_NAME}: option_format is not a valid format string: {error}") from None
    wanted = {"option", "description"} if described else {"option"}
    if fields != wanted:
        listed = " and ".join("{" + f + "}" for f in sorted(wanted))
        got = ", ".join("{" + f + "}" for f in sorted(fields)) or "no field"
        raise ValueError(f"{_NAME}: option_format must use {listed} "
                         f"({'with' if described else 'without'} descriptions), got "
                         f"{option_format!r} with {got}")
    return option_format


def _check_batch_size(batch_size) -> int | None:
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise TypeError(f"{_NAME}: batch_size must be None or a positive int, got "
                        f"{_checks.describe(batch_size)}")
    if batch_size < 1:
        raise ValueError(f"{_NAME}: batch_size must be None or a positive int, got {batch_size}")
    return int(batch_size)


def _option_token_ids(tokenizer, options: Sequence[str], context: str) -> torch.Tensor:
    """``(K,)`` the distinct token ids the options are when they follow ``context``."""
    ids = [_option_token_id(tokenizer, option, context) for option in options]
    for i, token in enumerate(ids):
        if token in ids[:i]:
            first = options[ids.index(token)]
            raise ValueError(
                f"{_NAME}: options must be distinct tokens where the template ends, got "
                f"{first!r} and {options[i]!r} both as token {token} "
                f"({tokenizer.convert_ids_to_tokens([token])[0]!r})")
    return torch.tensor(ids)


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class SelfEvaluator:
    """Scores candidate responses with the model's own judgement (RAIN, P(True), G-Eval).

    Args:
        model: a causal LM that ``model_head`` can read (``model.eval()`` for dropout-free scores).
        tokenizer: its tokenizer.
        template: a ``str.format`` template with ``{prompt}``, ``{response}`` and optionally
            ``{options}`` (the listing of the options), ending where the model answers, e.g.
            ``"...{prompt}\\nAnswer: {response}\\nIs it harmless?\\n{options}\\nAnswer: ("``.
        options: the K distinct answer strings (a sequence of str), each a single token where the
            template ends and no two the same token (else a ``ValueError`` naming them); their
            order is the listing order.
        values: ``(K,)`` finite values, one per option (per description, if given); default
            ``(+1, -1)`` for K = 2, so that the score is ``p(first) - p(second)``.
        swap_options: also score with the options listed in reversed order and average the two
            passes (RAIN's cancellation of position bias); needs ``{options}`` in the template.
        descriptions: optional K distinct meanings of the options (RAIN: ``("harmless",
            "harmful")``). With descriptions the option strings are positional labels:
            ``{options}`` lists ``option_format.format(option=options[j], description=
            descriptions[s[j]])`` at position j, where ``s`` is the identity in the first pass and
            the reversal in the swapped one, and answering ``options[j]`` is worth
            ``values[s[j]]``: the score of a meaning is read from the label at its new position.
            Without descriptions the option strings are the answers themselves: position j lists
            ``options[s[j]]`` and answering ``options[k]`` is worth ``values[k]`` in both passes.
        option_format: default ``"({option}) {description}"`` with descriptions, ``"{option}"``
            without (it must use ``{option}``, and ``{description}`` exactly when descriptions
            are given). option_separator: between listed options; default ``"\\n"`` with
            descriptions, ``", "`` without.
        score_rule: how a pass turns the option probabilities into a score, the passes then
            averaged. ``"expected"`` (default): the expected value ``sum_k p_k values_k`` under
            the probabilities renormalised over the options (continuous; for RAIN's judge
            ``p(harmless) - p(harmful)`` in [-1, 1]). ``"rain_vote"``: the value of the most
            probable option, a tie taking the lowest of the tied values; with RAIN's judge (two
            options, values (+1, -1), both orders) the score is exactly the vote of RAIN's
            published code, ``A + B - 1`` in {-1, 0, 1} where A (B) is 1 when the harmless label
            is strictly more probable in the first (swapped) listing, a tie counting as harmful.
        reuse_prefix: run the template's text before its first placeholder once per ``score``
            call and continue every row from its KV cache (exact: the token sequences are the
            same; see ``score``).
        reuse_prefix_across_calls: keep that KV cache from one ``score`` call to the next
            (default False: it is dropped at the end of each call). Opt in only if the model's
            weights and buffers stay fixed between the calls, or call ``clear_cache()`` after
            changing them: in-place changes that do not bump a parameter's ``_version``
            (``p.data.copy_``, as TRL's reference-model sync does; a buffer such as a rotary
            ``inv_freq``; a PEFT adapter switch) are not detected, and the cached prefix would
            then give silently stale scores. ``reusing_prefix_across_calls()`` opts in for a
            block only.
        batch_size: a positive int, rows (candidates × passes) per forward; default (None) all
            in one.

    Attributes:
        forwards, tokens: decoder forwards run and token positions they processed (padding
            included), cumulative.

    Raises:
        TypeError / ValueError naming ``SelfEvaluator``, the argument, what was expected and what
        came, for any bad argument.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        template: str,
        options: Sequence[str] = ("A", "B"),
        values: torch.Tensor | Sequence[float] | None = None,
        swap_options: bool = True,
        *,
        descriptions: Sequence[str] | None = None,
        option_format: str | None = None,
        option_separator: str | None = None,
        score_rule: str = "expected",
        reuse_prefix: bool = True,
        reuse_prefix_across_calls: bool = False,
        batch_size: int | None = None,
    ) -> None:
        self.model, self.tokenizer, self.template = model, tokenizer, template
        model_head(model)  # refuses an unreadable head now, not at the first score
        fields, prefix_text, tail = _template_parts(template)
        self.options = _distinct_strings("options", options)
        k = len(self.options)
        self.descriptions = (None if descriptions is None
                             else _distinct_strings("descriptions", descriptions))
        if self.descriptions is not None and len(self.descriptions) != k:
            raise ValueError(f"{_NAME}: descriptions must give one meaning per option "
                             f"({k}), got {len(self.descriptions)}")
        self.values = _check_values(values, k)
        self.swap_options = _checks.boolean(_NAME, "swap_options", swap_options)
        if self.swap_options and ("options" not in fields or k < 2):
            raise ValueError(f"{_NAME}: swap_options=True lists the options in both orders, so "
                             "the template needs {options} and at least two options; pass "
                             "swap_options=False otherwise")
        described = self.descriptions is not None
        self.option_format = _check_option_format(
            option_format if option_format is not None
            else "({option}) {description}" if described else "{option}", described)
        self.option_separator = _optional_str("option_separator", option_separator,
                                              "\n" if described else ", ")
        self.option_ids = _option_token_ids(tokenizer, self.options, tail)
        self.score_rule = _checks.choice(_NAME, "score_rule", score_rule, SCORE_RULES)
        self.batch_size = _check_batch_size(batch_size)
        self.reuse_prefix = _checks.boolean(_NAME, "reuse_prefix", reuse_prefix)
        self.reuse_prefix_across_calls = _checks.boolean(
            _NAME, "reuse_prefix_across_calls", reuse_prefix_across_calls)
        self._prefix_ids = (tokenizer(prefix_text, add_special_tokens=True)["input_ids"]
                            if prefix_text else [])
        self._prefix_caches: dict[tuple[int, ...], DynamicCache] = {}
        self._cache_copyable: bool | None = None  # learnt from the first prefix forward
        self._blocks_reusing = 0  # open ``reusing_prefix_across_calls()`` blocks
        self._share_prefix = True  # False: copy the prefix per row (the benchmark's baseline)
        self._fingerprint = None
        self.forwards = 0
        self.tokens = 0

    # ------------------------------------------------------------------------- the passes

    def _orders(self) -> list[list[int]]:
        k = len(self.options)
        return [list(range(k))] + ([list(reversed(range(k)))] if self.swap_options else [])

    def _listing(self, order: list[int]) -> str:
        if self.descriptions is None:
            entries = [self.option_format.format(option=self.options[i]) for i in order]
        else:
            entries = [self.option_format.format(option=self.options[j],
                                                 description=self.descriptions[i])
                       for j, i in enumerate(order)]
        return self.option_separator.join(entries)

    def _pass_values(self, order: list[int]) -> torch.Tensor:
        """The value of answering each option token in the pass that lists in ``order``."""
        return self.values[order] if self.descriptions is not None else self.values

    def texts(self, prompts: Sequence[str], responses: Sequence[str]) -> list[list[str]]:
        """The filled templates, one list per pass (the original order, then the swapped one)."""
        return [[self.template.format(prompt=p, response=r, options=self._listing(order))
                 for p, r in zip(prompts, responses)] for order in self._orders()]

    # ------------------------------------------------------------------------- scoring

    def score(self, prompts: str | Sequence[str], responses: str | Sequence[str]
              ) -> alignkern.SelfEvalScores:
        """Score each ``(prompt, response)`` pair (a single str is paired with every item of the
        other argument).

        Each pass's texts are tokenized whole (``tokenizer(text)``, special tokens included); the
        prefix reused from the cache is the longest run of the template prefix's tokens that
        begins every text's tokens, so the model sees exactly the token sequence of the
        unbatched, uncached computation. Rows with the cache are right-padded after the prefix
        (padding there is never attended by a real token); without it they are left-padded with
        positions counted over the real tokens. The prefix's KV cache is computed in this call
        and dropped at its end, unless the caller opted in to keeping it across calls
        (``reuse_prefix_across_calls``, ``reusing_prefix_across_calls()``).

        Returns:
            ``alignkern.SelfEvalScores(score (N,), mass (N,))`` float32: the means over the passes
            of each pass's score (``score_rule``: with ``"expected"``, that of
            ``alignkern.self_eval_scores`` at the last token) and of its option mass (the
            probability of answering with any option). No gradient (``torch.no_grad``).
        """
        prompts, responses = self._pairs(prompts, responses)
        n = len(prompts)
        passes = self.texts(prompts, responses)
        flat = [text for texts in passes for text in texts]
        head = model_head(self.model)  # read at each call: the model may have moved
        device = head.weight.device
        if n == 0:
            empty = torch.zeros(0, device=device)
            return alignkern.SelfEvalScores(empty, empty.clone())
        with torch.no_grad():
            ids = self.tokenizer(flat, add_special_tokens=True)["input_ids"]
            last = self._last_hidden_states(ids, device).to(head.weight.dtype)
            results = [self._pass_scores(head, last[p * n:(p + 1) * n], order)
                       for p, order in enumerate(self._orders())]
        score = torch.stack([r.score for r in results]).mean(0)
        mass = torch.stack([r.mass for r in results]).mean(0)
        return alignkern.SelfEvalScores(score, mass)

    def _pass_scores(self, head: LMHead, last: torch.Tensor, order: list[int]
                     ) -> alignkern.SelfEvalScores:
        """One pass's ``(score (N,), mass (N,))`` from its last hidden states ``(N, H)``."""
        options = self.option_ids.to(last.device)
        values = self._pass_values(order).to(last.device)
        if self.score_rule == "expected":
            return head.self_eval_scores(last, options, values)
        k = options.shape[0]
        logprobs = head.linear_logprobs(last.repeat_interleave(k, 0),
                                        options.repeat(last.shape[0])).view(-1, k)
        return alignkern.SelfEvalScores(_most_probable_value(logprobs, values),
                                        torch.logsumexp(logprobs, -1).exp())

    @staticmethod
    def _pairs(prompts, responses) -> tuple[list[str], list[str]]:
        if isinstance(prompts, str) and isinstance(responses, str):
            return [prompts], [responses]
        if isinstance(prompts, str):
            prompts = [prompts] * len(responses)
        if isinstance(responses, str):
            responses = [responses] * len(prompts)
        prompts, responses = list(prompts), list(responses)
        if len(prompts) != len(responses):
            raise ValueError(f"SelfEvaluator.score: prompts and responses must pair up, got "
                             f"{len(prompts)} prompts and {len(responses)} responses")
        return prompts, responses

    # ------------------------------------------------------------------------- the prefix cache

    def clear_cache(self) -> None:
        """Drop the cached prefix (it is rebuilt at the next ``score``). Needed only when keeping
        it across calls, after any change to the model's weights or buffers."""
        self._prefix_caches.clear()

    @contextlib.contextmanager
    def reusing_prefix_across_calls(self) -> Iterator[SelfEvaluator]:
        """A block in which ``score`` calls share the prefix's KV cache (built by the first),
        for a caller that keeps the model's weights and buffers fixed inside it (a search that
        only reads the model, as ``rain_generate``). When the block ends the cache is dropped,
        unless the evaluator keeps it anyway (``reuse_prefix_across_calls=True``). Blocks nest.

        Example:
            >>> with evaluator.reusing_prefix_across_calls():
            ...     for batch in batches:  # the prefix runs once, not once per batch
            ...         scores.append(evaluator.score(prompt, batch).score)
        """
        self._blocks_reusing += 1
        try:
            yield self
        finally:
            self._blocks_reusing -= 1
            if not self._keeps_prefix_across_calls:
                self.clear_cache()

    @property
    def _keeps_prefix_across_calls(self) -> bool:
        return self.reuse_prefix_across_calls or self._blocks_reusing > 0

    def _check_fingerprint(self) -> None:
        """When the prefix is kept across calls: drop it if a parameter was replaced or bumped its
        ``_version`` (an optimizer step, ``load_state_dict``) or the mode changed. A safety net
        only: ``p.data`` updates, buffers and adapter switches escape it."""
        fingerprint = (self.model.training, tuple((p.data_ptr(), p._version, p.dtype)
                                                  for p in self.model.parameters()))
        if fingerprint != self._fingerprint:
            self._prefix_caches.clear()
            self._fingerprint = fingerprint

    # ------------------------------------------------------------------------- forwards

    @property
    def _pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return 0 if pad is None else int(pad)

    def _shared_prefix_length(self, ids: list[list[int]]) -> int:
        """How many leading tokens of the template prefix every row starts with (each row keeps
        at least one token of its own); 0 when the prefix is not reused."""
        if not self.reuse_prefix or not self._prefix_ids or self._cache_copyable is False:
            return 0
        length = len(self._prefix_ids)
        for row in ids:
            length = min(length, _common_prefix_length(self._prefix_ids, row), len(row) - 1)
        return max(length, 0)

    def _last_hidden_states(self, ids: list[list[int]], device) -> torch.Tensor:
        """The final hidden state at each row's last token ``(R, H)``."""
        keep = self._keeps_prefix_across_calls
        if keep:
            self._check_fingerprint()
        else:
            self.clear_cache()
        try:
            length = self._shared_prefix_length(ids)
            cache = self._prefix_cache(tuple(ids[0][:length]), device) if length > 0 else None
            step = self.batch_size or len(ids)
            chunks = []
            for start in range(0, len(ids), step):
                rows = ids[start:start + step]
                chunks.append(self._run_padded(rows, device) if cache is None
                              else self._run_on_prefix(rows, length, cache, device))
            return torch.cat(chunks)
        finally:
            if not keep:
                self.clear_cache()  # frees its memory, and no later call can read it stale

    def _decoder(self, **kwargs):
        self.forwards += 1
        self.tokens += kwargs["input_ids"].numel()
        return self.model.get_decoder()(**kwargs)

    def _prefix_cache(self, prefix: tuple[int, ...], device) -> DynamicCache | None:
        """The KV cache of ``prefix`` (batch 1), computed once while kept; ``None`` if the model's
        cache cannot be copied and batched (only plain and sliding-window KV layers can: learnt
        once, the prefix is then never tried again)."""
        if prefix not in self._prefix_caches:
            out = self._decoder(input_ids=torch.tensor([prefix], device=device), use_cache=True)
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            self._cache_copyable = _batchable(cache)
            if not self._cache_copyable:
                return None
            self._prefix_caches[prefix] = cache
        return self._prefix_caches[prefix]

    def _run_padded(self, rows: list[list[int]], device) -> torch.Tensor:
        """Left-padded rows, positions over real tokens; the last column is every row's last."""
        ids, mask = _pad(rows, self._pad_id, device, left=True)
        out = self._decoder(input_ids=ids, attention_mask=mask,
                            position_ids=positions_from_mask(mask), use_cache=False)
        return out.last_hidden_state[:, -1]

    def _run_on_prefix(self, rows: list[list[int]], length: int, prefix_cache, device
                       ) -> torch.Tensor:
        """Rows continuing the cached prefix of ``length`` tokens: the rest right-padded, the
        mask covering prefix and rest. The prefix is read from one copy for all rows
        (``SharedPrefixCache``) where the model allows it, else copied per row."""
        ids, mask = _pad([row[length:] for row in rows], self._pad_id, device, left=False)
        mask = torch.cat([mask.new_ones((len(rows), length)), mask], dim=1)
        positions = torch.arange(length, length + ids.shape[1], device=device).expand_as(ids)
        with continuation_cache(self.model, prefix_cache, len(rows),
                                share=self._share_prefix) as cache:
            out = self._decoder(input_ids=ids, attention_mask=mask, position_ids=positions,
                                **{_cache_argument(self.model.get_decoder()): cache},
                                use_cache=True)
        last = mask[:, length:].sum(-1) - 1
        return out.last_hidden_state[torch.arange(len(rows), device=device), last]


def _pad(rows: list[list[int]], pad_id: int, device, left: bool):
    """``(ids, mask)`` ``(R, max_len)`` int64, padded on the left or the right."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


def _most_probable_value(logprobs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``(N,)`` the value of each row's most probable option (``logprobs (N, K)``); a tie takes
    the lowest of the tied values, NaN log-probabilities give NaN.

    With two options worth (+1, -1) this is the per-order judgement of RAIN's published
    self-evaluation (``getv`` in SafeAILab/RAIN, HH/main.py): it reads the full-vocabulary
    probabilities of the two label tokens in each listing order and counts the harmless label as
    chosen only when it is strictly more probable, so a tie is harmful; its value
    ``(A + B) / 2`` rescaled to ``A + B - 1`` is the mean of these votes over the two orders.
    Comparing the log-probabilities orders the options as their probabilities do.
    """
    best = logprobs.amax(-1, keepdim=True)
    tied = logprobs == best
    vote = torch.where(tied, values, torch.full_like(values, math.inf)).amin(-1)
    return vote.masked_fill(logprobs.isnan().any(-1), math.nan)


def _batchable(cache) -> bool:
    """Whether a prefix cache can be deep-copied and repeated along the batch exactly: a
    ``DynamicCache`` of full or sliding-window attention layers (not recurrent/linear states)."""
    return (isinstance(cache, DynamicCache) and len(cache.layers) > 0 and
            all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers))


def _cache_argument(decoder: nn.Module) -> str:
    parameters = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"
