"""RAIN / P(True) / G-Eval self-evaluation with a transformers causal LM: ``SelfEvaluator``.

The model reads a template filled with a prompt and a candidate response and answers with one of
K option tokens; the score is the expected value of the answer under the probabilities
renormalised over the options (``alignkern.self_eval_scores``), read from the last hidden state
through the fused LM head, so no logits are built.

Two things make it cheap: every candidate (and both option orders) is scored in one batched
forward, and the template's shared prefix (the text before its first placeholder: instructions,
few-shot examples) runs through the model once; its KV cache is copied for each batch and the
candidates run on top of it.
"""

from __future__ import annotations

import copy
import inspect
import string
from collections.abc import Sequence

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

import alignkern

from .head import model_head
from .scoring import positions_from_mask

_FIELDS = ("prompt", "response", "options")


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
    if not isinstance(option, str):
        raise TypeError(f"SelfEvaluator: each option must be a str, got {option!r}")
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
        options: the K answer strings, each a single token where the template ends (else a
            ``ValueError`` naming it); their order is the listing order.
        values: ``(K,)`` the value of each option (of each description, if given); default
            ``(+1, -1)`` for K = 2, so that the score is ``p(first) - p(second)``.
        swap_options: also score with the options listed in reversed order and average the two
            passes (RAIN's cancellation of position bias); needs ``{options}`` in the template.
        descriptions: optional K meanings of the options (RAIN: ``("harmless", "harmful")``). With
            descriptions the option strings are positional labels: ``{options}`` lists
            ``option_format.format(option=options[j], description=descriptions[s[j]])`` at
            position j, where ``s`` is the identity in the first pass and the reversal in the
            swapped one, and answering ``options[j]`` is worth ``values[s[j]]``: the score of a
            meaning is read from the label at its new position. Without descriptions the option
            strings are the answers themselves: position j lists ``options[s[j]]`` and answering
            ``options[k]`` is worth ``values[k]`` in both passes.
        option_format: default ``"({option}) {description}"`` with descriptions, ``"{option}"``
            without. option_separator: between listed options; default ``"\\n"`` with
            descriptions, ``", "`` without.
        reuse_prefix: run the template's text before its first placeholder once and reuse its
            KV cache (exact: the token sequences are the same; see ``score``).
        batch_size: rows (candidates × passes) per forward; default all in one.

    Attributes:
        forwards, tokens: decoder forwards run and token positions they processed (padding
            included), cumulative; ``clear_cache()`` drops the prefix cache (it is also dropped
            when any parameter of the model changes).
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
        reuse_prefix: bool = True,
        batch_size: int | None = None,
    ) -> None:
        self.model, self.tokenizer, self.template = model, tokenizer, template
        model_head(model)  # refuses an unreadable head now, not at the first score
        fields, prefix_text, tail = _template_parts(template)
        self.options = tuple(options)
        k = len(self.options)
        if k == 0:
            raise ValueError("SelfEvaluator: options must name at least one answer")
        self.descriptions = None if descriptions is None else tuple(descriptions)
        if self.descriptions is not None and len(self.descriptions) != k:
            raise ValueError(f"SelfEvaluator: descriptions must give one meaning per option "
                             f"({k}), got {len(self.descriptions)}")
        self.values = self._check_values(values, k)
        if swap_options and ("options" not in fields or k < 2):
            raise ValueError("SelfEvaluator: swap_options=True lists the options in both orders, so "
                             "the template needs {options} and at least two options; pass "
                             "swap_options=False otherwise")
        self.swap_options = bool(swap_options)
        described = self.descriptions is not None
        self.option_format = option_format or ("({option}) {description}" if described
                                               else "{option}")
        self.option_separator = option_separator if option_separator is not None else (
            "\n" if described else ", ")
        self.option_ids = torch.tensor([_option_token_id(tokenizer, o, tail) for o in self.options])
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"SelfEvaluator: batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size
        self.reuse_prefix = bool(reuse_prefix)
        self._prefix_ids = (tokenizer(prefix_text, add_special_tokens=True)["input_ids"]
                            if prefix_text else [])
        self._prefix_caches: dict[tuple[int, ...], object] = {}
        self._fingerprint = None
        self.forwards = 0
        self.tokens = 0

    @staticmethod
    def _check_values(values, k: int) -> torch.Tensor:
        if values is None:
            if k != 2:
                raise ValueError(f"SelfEvaluator: values must be given for {k} options (the "
                                 "default (+1, -1) is for two)")
            return torch.tensor([1.0, -1.0])
        values = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
        if values.shape[0] != k:
            raise ValueError(f"SelfEvaluator: values must give one value per option ({k}), got "
                             f"{values.shape[0]}")
        return values

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
        positions counted over the real tokens.

        Returns:
            ``alignkern.SelfEvalScores(score (N,), mass (N,))`` float32, the means over the passes
            of ``alignkern.self_eval_scores`` at the last token. No gradient (``torch.no_grad``).
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
            results = [
                head.self_eval_scores(last[p * n:(p + 1) * n], self.option_ids.to(device),
                                      self._pass_values(order).to(device))
                for p, order in enumerate(self._orders())
            ]
        score = torch.stack([r.score for r in results]).mean(0)
        mass = torch.stack([r.mass for r in results]).mean(0)
        return alignkern.SelfEvalScores(score, mass)

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

    def clear_cache(self) -> None:
        """Drop the cached prefix (it is rebuilt at the next ``score``)."""
        self._prefix_caches.clear()

    # ------------------------------------------------------------------------- forwards

    @property
    def _pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return 0 if pad is None else int(pad)

    def _check_fingerprint(self) -> None:
        """Drop cached prefixes when the model changed (an optimizer step bumps ``_version``)."""
        fingerprint = (self.model.training, tuple((p.data_ptr(), p._version, p.dtype)
                                                  for p in self.model.parameters()))
        if fingerprint != self._fingerprint:
            self._prefix_caches.clear()
            self._fingerprint = fingerprint

    def _shared_prefix_length(self, ids: list[list[int]]) -> int:
        """How many leading tokens of the template prefix every row starts with (each row keeps
        at least one token of its own)."""
        if not self.reuse_prefix or not self._prefix_ids:
            return 0
        length = len(self._prefix_ids)
        for row in ids:
            length = min(length, _common_prefix_length(self._prefix_ids, row), len(row) - 1)
        return max(length, 0)

    def _last_hidden_states(self, ids: list[list[int]], device) -> torch.Tensor:
        """The final hidden state at each row's last token ``(R, H)``."""
        self._check_fingerprint()
        length = self._shared_prefix_length(ids)
        cache = self._prefix_cache(tuple(ids[0][:length]), device) if length > 0 else None
        step = self.batch_size or len(ids)
        chunks = []
        for start in range(0, len(ids), step):
            rows = ids[start:start + step]
            chunks.append(self._run_padded(rows, device) if cache is None
                          else self._run_on_prefix(rows, length, cache, device))
        return torch.cat(chunks)

    def _decoder(self, **kwargs):
        self.forwards += 1
        self.tokens += kwargs["input_ids"].numel()
        return self.model.get_decoder()(**kwargs)

    def _prefix_cache(self, prefix: tuple[int, ...], device):
        """The KV cache of ``prefix`` (batch 1), computed once; ``None`` if the model's cache
        cannot be copied and batched (only plain and sliding-window KV layers can)."""
        if prefix not in self._prefix_caches:
            out = self._decoder(input_ids=torch.tensor([prefix], device=device), use_cache=True)
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            self._prefix_caches[prefix] = cache if _batchable(cache) else None
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
        cache copied and repeated per row, the mask covering prefix and rest."""
        ids, mask = _pad([row[length:] for row in rows], self._pad_id, device, left=False)
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(len(rows))
        mask = torch.cat([mask.new_ones((len(rows), length)), mask], dim=1)
        positions = torch.arange(length, length + ids.shape[1], device=device).expand_as(ids)
        out = self._decoder(input_ids=ids, attention_mask=mask, position_ids=positions,
                            **{_cache_argument(self.model.get_decoder()): cache}, use_cache=True)
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


def _batchable(cache) -> bool:
    """Whether a prefix cache can be deep-copied and repeated along the batch exactly: a
    ``DynamicCache`` of full or sliding-window attention layers (not recurrent/linear states)."""
    return (isinstance(cache, DynamicCache) and len(cache.layers) > 0 and
            all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers))


def _cache_argument(decoder: nn.Module) -> str:
    parameters = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"
