"""What every loop needs: argument checks with errors that name the argument, tokenization with
explicit padding, generation with pass-through arguments, decoding, KV-cache copies and a counter
of decoder forwards. Only the integrations layer and public alignkern functions are used."""

from __future__ import annotations

import contextlib
import inspect
import numbers
import string
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from .. import _checks

# ----------------------------------------------------------------------------- argument checks


def positive_int(fn: str, arg: str, value) -> int:
    """An int >= 1 (TypeError for a non-integer, ValueError below 1)."""
    number = _checks.integer(fn, arg, value)
    if number < 1:
        raise ValueError(f"{fn}: {arg} must be at least 1, got {number}")
    return number


def probability(fn: str, arg: str, value) -> float:
    return _checks.real(fn, arg, value, low=0.0, high=1.0)


def text_list(fn: str, arg: str, value) -> list[str]:
    """A str (one item) or a non-empty sequence of str."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Sequence) or isinstance(value, bytes):
        raise TypeError(f"{fn}: {arg} must be a str or a sequence of str, got "
                        f"{_checks.describe(value)}")
    items = list(value)
    if not items:
        raise ValueError(f"{fn}: {arg} must hold at least one text, got an empty sequence")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise TypeError(f"{fn}: {arg}[{i}] must be a str, got {_checks.describe(item)}")
    return items


def text(fn: str, arg: str, value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{fn}: {arg} must be a str, got {_checks.describe(value)}")
    return value


def generation_kwargs(fn: str, value, *, reserved: Sequence[str] = (),
                      defaults: dict | None = None) -> dict:
    """A copy of the user's ``generate`` keyword arguments over ``defaults``; the loop's own
    arguments (``reserved``) may not be given."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise TypeError(f"{fn}: generation_kwargs must be a dict of model.generate arguments, got "
                        f"{_checks.describe(value)}")
    taken = sorted(set(value) & set(reserved))
    if taken:
        raise ValueError(f"{fn}: generation_kwargs may not set {', '.join(taken)}: the loop sets "
                         "them itself")
    return {**(defaults or {}), **value}


def template_tail(template: str) -> str:
    """The literal text after the last ``{field}`` of a ``str.format`` template."""
    parsed = list(string.Formatter().parse(template))
    last = max((i for i, part in enumerate(parsed) if part[1] is not None), default=-1)
    return "".join(part[0] for part in parsed[last + 1:])


def check_evaluator(fn: str, evaluator, tokenizer) -> None:
    """``evaluator`` must have ``score(prompts, responses)`` returning ``SelfEvalScores``-like
    ``(score, mass)`` or a tensor. If it declares ``options`` and a ``template`` (a
    ``SelfEvaluator``), each option must be one token where the template ends, under the loop's
    tokenizer (the evaluator may have been built with another one, or changed since)."""
    if evaluator is None or not callable(getattr(evaluator, "score", None)):
        raise TypeError(f"{fn}: evaluator must have a score(prompts, responses) method (e.g. an "
                        f"alignkern SelfEvaluator), got {_checks.describe(evaluator)}")
    options, template = getattr(evaluator, "options", None), getattr(evaluator, "template", None)
    if options is None or not isinstance(template, str):
        return
    tail = template_tail(template)
    before = tokenizer.encode(tail, add_special_tokens=False)
    for option in options:
        after = tokenizer.encode(tail + str(option), add_special_tokens=False)
        if len(after) != len(before) + 1 or after[:len(before)] != before:
            pieces = tokenizer.convert_ids_to_tokens(after[len(before):])
            raise ValueError(f"{fn}: evaluator option {option!r} is not a single token after the "
                             f"template's ending {tail[-30:]!r} under this tokenizer (it is "
                             f"{pieces}); the options must be one token each")


def scores_of(fn: str, result, rows: int) -> torch.Tensor:
    """The ``(rows,)`` float32 scores an evaluator or a scoring callable returned (a
    ``SelfEvalScores``, anything with ``.score``, a tensor or a sequence of numbers)."""
    value = getattr(result, "score", result)
    try:
        value = torch.as_tensor(value, dtype=torch.float32).detach().reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{fn}: the scorer must return scores (a tensor or numbers), got "
                        f"{_checks.describe(result)}") from None
    if value.numel() != rows:
        raise ValueError(f"{fn}: the scorer returned {value.numel()} scores for {rows} candidates")
    return value.cpu()


def real_number(fn: str, arg: str, value, **kwargs) -> float:
    return _checks.real(fn, arg, value, **kwargs)


def is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# ----------------------------------------------------------------------------- tokens


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def pad_id(tokenizer, model: nn.Module | None = None) -> int:
    """The tokenizer's pad id, else its EOS, else the model's, else 0."""
    for source in (tokenizer, getattr(model, "generation_config", None)):
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(source, name, None)
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if value is not None:
                return int(value)
    return 0


def eos_ids(model: nn.Module, tokenizer, generation_kwargs: dict | None = None) -> list[int]:
    """The ids that end a generation, as ``generate`` will use them: ``eos_token_id`` (or a
    ``generation_config``'s) in the pass-through arguments, else the model's generation config's,
    else the tokenizer's."""
    kwargs = generation_kwargs or {}
    value = kwargs.get("eos_token_id")
    if value is None:
        value = getattr(kwargs.get("generation_config"), "eos_token_id", None)
    if value is None:
        value = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if value is None:
        value = getattr(tokenizer, "eos_token_id", None)
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Each text tokenized whole, special tokens included (as the tokenizer's ``__call__``)."""
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]


def left_pad(rows: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` ``(R, max_len)`` int64, left-padded (what ``generate`` expects)."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def until_eos(tokens: Sequence[int], eos: Sequence[int]) -> tuple[list[int], bool]:
    """``tokens`` up to and including the first EOS, and whether there was one."""
    tokens = [int(t) for t in tokens]
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[:i + 1], True
    return tokens, False


def decode(tokenizer, tokens: Sequence[int]) -> str:
    return tokenizer.decode(list(tokens), skip_special_tokens=True)


def decode_generated(tokenizer, generated: torch.Tensor, eos: Sequence[int]) -> list[str]:
    """``generated (R, G)``: each row up to its first EOS, decoded without special tokens."""
    return [decode(tokenizer, until_eos(row, eos)[0]) for row in generated.tolist()]


def generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
             kwargs: dict, *, pad: int, **loop_kwargs):
    """``model.generate`` with ``return_dict_in_generate=True``; the loop's arguments override
    the user's pass-through ones (which were checked not to collide)."""
    arguments = {"pad_token_id": pad, **kwargs, **loop_kwargs, "return_dict_in_generate": True}
    if attention_mask is not None:
        arguments["attention_mask"] = attention_mask
    with torch.no_grad():
        return model.generate(input_ids=input_ids, **arguments)


# ----------------------------------------------------------------------------- KV caches


def _cache_argument(module: nn.Module) -> str:
    parameters = inspect.signature(module.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def copyable(cache) -> bool:
    """Whether ``cache`` can be deep-copied and repeated along the batch exactly: a
    ``DynamicCache`` of full or sliding-window attention layers (not recurrent states)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    return (isinstance(cache, DynamicCache) and len(cache.layers) > 0 and
            all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers))


@contextlib.contextmanager
def continuing(model: nn.Module, cache, rows: int) -> Iterator[dict]:
    """``generate``'s cache argument for ``rows`` rows continuing ``cache`` (batch 1 or G; None:
    no cache, ``{}``) inside the block: its prefix held once where the model allows it
    (``SharedPrefixCache`` on alignkern attention), else a deep copy repeated per row
    (``generate`` appends to the cache it is given, so the original is never passed)."""
    if cache is None:
        yield {}
        return
    from alignkern.integrations.transformers.shared_prefix import continuation_cache

    with continuation_cache(model, cache, rows) as rows_cache:
        yield {"cache": rows_cache}


def extend_cache(model: nn.Module, cache, tokens: Sequence[int], device, **forward_kwargs):
    """Run the decoder over ``tokens`` (batch 1) on top of ``cache`` (None: from scratch) and
    return the cache covering them too, or None when it cannot be reused (``copyable``).
    ``forward_kwargs`` (e.g. ``alignkern_key_bias`` over all keys) reach the attention layers."""
    if not tokens:
        return cache
    ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)
    past = 0 if cache is None else cache.get_seq_length()
    positions = torch.arange(past, past + ids.shape[1], device=device)[None]
    decoder = model.get_decoder()
    with torch.no_grad():
        out = decoder(input_ids=ids, position_ids=positions, use_cache=True,
                      **{_cache_argument(decoder): cache}, **forward_kwargs)
    new = output_cache(out)
    return new if copyable(new) else None


def output_cache(out):
    """The KV cache a forward returned (``cache`` in transformers 5.x, ``past_key_values``
    before)."""
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def decode_step_seconds(model: nn.Module, input_ids: torch.Tensor, steps: int = 16) -> float:
    """Wall seconds per plain greedy decoding step after ``input_ids (1, T)``: one token through
    the model with its KV cache, the last row's logits, the argmax."""
    import time

    argument = _cache_argument(model)
    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)
        if input_ids.device.type == "cuda":
            torch.cuda.synchronize(input_ids.device)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=token, use_cache=True, **{argument: cache})
            cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)
        if input_ids.device.type == "cuda":
            torch.cuda.synchronize(input_ids.device)
        return (time.perf_counter() - start) / steps


# ----------------------------------------------------------------------------- counting


class ForwardCounter:
    """Counts decoder forwards and the token positions they process while active (``generate``
    steps, the evaluator's forwards and the loop's own all go through the decoder)."""

    def __init__(self) -> None:
        self.forwards = 0
        self.positions = 0

    def _hook(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
            ids = None if ids is None else ids[..., 0]
        self.forwards += 1
        self.positions += 0 if ids is None else int(ids.numel())


@contextlib.contextmanager
def count_forwards(model: nn.Module) -> Iterator[ForwardCounter]:
    counter = ForwardCounter()
    handle = model.get_decoder().register_forward_pre_hook(counter._hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


Scorer = Callable[[list[str], list[str]], object]


def prefix_kept_for_the_loop(evaluator) -> contextlib.AbstractContextManager:
    """A ``SelfEvaluator``'s ``reusing_prefix_across_calls()`` block, for a loop that only reads
    the weights while it runs (its judge prefix then runs once per loop instead of once per
    evaluator call, and the cache cannot go stale inside it); nothing for other evaluators."""
    keep = getattr(evaluator, "reusing_prefix_across_calls", None)
    return keep() if callable(keep) else contextlib.nullcontext()
