"""RAIN (Li et al. 2023, "RAIN: Your Language Models Can Align Themselves without Finetuning"):
a rewindable tree search over token sets in which the model evaluates its own partial answers.

Outer loop: search from the committed answer, commit the most-visited token set, make it the new
root (its subtree and statistics kept), repeat until EOS or ``max_new_tokens``. Inner loop (one
iteration): *forward* — descend from the root by PUCT to a leaf; *expand* the leaf into
``expand`` token sets of the current length; *evaluate* every new leaf in one batched
self-evaluation; *backward* — update values and visits along the path (and, with ``embed``,
similarity-weighted updates of siblings); then *rewind* to the root.

Differences from RAIN's published code, all deliberate: new leaves are evaluated when they are
created, all siblings in one batch (RAIN evaluates one selected leaf per iteration, unbatched),
so each node's statistics are the mean and count of the evaluations in its subtree; the value is
the continuous ``p_A - p_B`` by default (RAIN's thresholded vote with a ``SelfEvaluator`` built
with ``score_rule="rain_vote"``); the partial answer is evaluated as it stands (RAIN first samples a
continuation to the next punctuation mark); the iteration count restarts at 0 for each decision;
RAIN's dynamic widening of a node whose children all look bad (``checkadd``) and its clamp of the
greedy set's prior are not implemented.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from .. import _checks
from . import _common

# --------------------------------------------------------------------------------- results


class RainChild(NamedTuple):
    """A root child's statistics when a decision was made: its token set, prior, visit count
    (evaluations in its subtree plus similarity credit) and value (their mean)."""

    tokens: tuple[int, ...]
    prior: float
    visits: float
    value: float


class RainStep(NamedTuple):
    """One committed decision: the token set committed (the most-visited root child), how many
    search iterations it took, the root's children, and the path (token sets below the root)
    that each iteration selected before expanding or re-evaluating its leaf."""

    tokens: tuple[int, ...]
    iterations: int
    children: list[RainChild]
    paths: list[tuple[tuple[int, ...], ...]]


class RainResult(NamedTuple):
    """What ``rain_generate`` returns: the answer ``text`` (special tokens skipped) and its
    ``token_ids``; the search ``iterations`` in all; ``evaluations``: partial answers the evaluator
    scored; ``forwards``: model forwards (generation steps, cache extensions and the evaluator's,
    if it runs on this model; plus its own count if it runs on another); ``steps``: one
    ``RainStep`` per committed token set."""

    text: str
    iterations: int
    evaluations: int
    forwards: int
    token_ids: list[int]
    steps: list[RainStep]


# --------------------------------------------------------------------------------- the tree


class _Node:
    """A token set in the search tree. ``visits`` and ``value`` are the count and mean of the
    evaluations backed up through it (fractional with similarity credit); ``own`` its own
    evaluation; ``real_visits`` counts backups without similarity credit (RAIN's ``fn``), which
    weighs the running mean of its path embedding."""

    __slots__ = ("tokens", "parent", "children", "prior", "visits", "value", "own", "step",
                 "terminal", "embedding", "real_visits")

    def __init__(self, tokens: tuple[int, ...], parent: _Node | None, prior: float, step: int,
                 terminal: bool = False):
        self.tokens, self.parent, self.prior, self.step = tokens, parent, prior, step
        self.children: list[_Node] = []
        self.visits = 0.0
        self.value = 0.0
        self.own = 0.0
        self.terminal = terminal
        self.embedding: torch.Tensor | None = None
        self.real_visits = 0

    def most_visited(self) -> _Node:
        """RAIN's choice: most visits, ties to the higher value, then to the earlier child."""
        return max(self.children, key=lambda c: (c.visits, c.value))  # max keeps the first


def _mix_uniform(children: list[_Node]) -> None:
    """Priors at the root: 0.75 * prior + 0.25 * uniform, renormalised (RAIN)."""
    if not children:
        return
    total = sum(c.prior for c in children) or 1.0
    mixed = [0.75 * c.prior / total + 0.25 / len(children) for c in children]
    norm = sum(mixed)
    for child, p in zip(children, mixed):
        child.prior = p / norm


# --------------------------------------------------------------------------------- the search


class _Options(NamedTuple):
    max_iters: int
    min_iters: int
    value_threshold: float
    c_puct: float
    token_set_lengths: tuple[int, ...]
    expand: int
    top_k: int
    temperature: float
    sim_gamma: float
    sim_threshold: float
    embed: Callable | None
    max_new_tokens: int
    generation_kwargs: dict


class _Search:
    """The tree, the committed answer and its KV cache, for one prompt."""

    def __init__(self, model, tokenizer, prompt: str, evaluator, options: _Options):
        self.model, self.tokenizer, self.prompt, self.evaluator = model, tokenizer, prompt, evaluator
        self.o = options
        self.device = _common.model_device(model)
        self.pad = _common.pad_id(tokenizer, model)
        self.eos = _common.eos_ids(model, tokenizer, options.generation_kwargs)
        self.prompt_ids = _common.encode(tokenizer, [prompt])[0]
        self.answer: list[int] = []
        self.root = _Node((), None, 1.0, 0)
        self.q_low, self.q_high = -1.0, 1.0  # RAIN's initial normalisation range
        self.evaluations = 0
        # the cache covers every committed token but the last (generate needs one uncached token)
        self.cached = 0
        self.cache = None
        self.reusable = True  # False once the model's cache turns out not to be copyable
        self._extend_cache()

    # ----------------------------------------------------------------- committed prefix

    def _base(self) -> list[int]:
        return self.prompt_ids + self.answer

    def _extend_cache(self) -> None:
        base = self._base()
        new = base[self.cached:len(base) - 1]
        if not self.reusable or not new:
            return
        self.cache = _common.extend_cache(self.model, self.cache, new, self.device)
        self.reusable = self.cache is not None  # else every expansion runs from scratch
        self.cached = len(base) - 1 if self.reusable else 0

    def commit(self) -> _Node:
        """Commit the most-visited root child and make it the root."""
        chosen = self.root.most_visited()
        self.answer.extend(chosen.tokens)
        chosen.parent = None
        _mix_uniform(chosen.children)
        self.root = chosen
        self._extend_cache()
        return chosen

    def finished(self) -> bool:
        return (bool(self.answer) and self.answer[-1] in self.eos) or \
            len(self.answer) >= self.o.max_new_tokens

    # ----------------------------------------------------------------- one iteration

    def iterate(self) -> tuple[tuple[int, ...], ...]:
        """Select, expand and evaluate (or re-evaluate a terminal leaf), back up. Returns the
        selected path's token sets."""
        path = self._select()
        leaf = path[-1]
        if leaf.terminal:
            self._backup_all(path, [leaf], [leaf.own])
        else:
            children = self._expand(leaf, path)
            values = self._evaluate(path, children)
            for child, value in zip(children, values):
                child.own = value
            leaf.children = children
            if leaf is self.root:
                _mix_uniform(children)
            self._backup_all(path, children, values)
        return tuple(node.tokens for node in path[1:])

    def _puct(self, node: _Node) -> float:
        parent_visits = node.parent.visits if node.parent is not None else 0.0
        q = 0.0 if node.visits == 0 else (node.value - self.q_low) / (self.q_high - self.q_low + 1e-5)
        return q + self.o.c_puct * node.prior * math.sqrt(parent_visits) / (1.0 + node.visits)

    def _select(self) -> list[_Node]:
        """Descend by PUCT (ties: the earlier child) to a node without children."""
        path = [self.root]
        while path[-1].children:
            children = path[-1].children
            scores = [self._puct(c) for c in children]
            path.append(children[scores.index(max(scores))])
        return path

    # ----------------------------------------------------------------- expansion

    def _path_tokens(self, path: Sequence[_Node]) -> list[int]:
        return [t for node in path[1:] for t in node.tokens]

    def _expand(self, leaf: _Node, path: list[_Node]) -> list[_Node]:
        """``expand`` token sets of length ``token_set_lengths[leaf.step]`` (the last length for
        deeper steps, capped by the token budget) continuing the leaf, with their priors."""
        lengths = self.o.token_set_lengths
        used = len(self.answer) + len(self._path_tokens(path))
        length = min(lengths[min(leaf.step, len(lengths) - 1)], self.o.max_new_tokens - used)
        base = self._base() + self._path_tokens(path)
        if length == 1:
            sets, logps = self._top_tokens(base)
        else:
            sets, logps = self._sampled_sets(base, length)
        priors = torch.softmax(torch.tensor(logps, dtype=torch.float64), 0).tolist()
        return [_Node(tokens, leaf, prior, leaf.step + 1,
                      terminal=(ended or used + len(tokens) >= self.o.max_new_tokens))
                for (tokens, ended), prior in zip(sets, priors)]

    def _generate(self, base: list[int], rows: int, **kwargs):
        ids = torch.tensor([base] * rows, dtype=torch.long, device=self.device)
        mask = torch.ones_like(ids)
        prefix = self.cache if self.reusable and self.cached else None
        with _common.continuing(self.model, prefix, rows) as cache:
            return _common.generate(self.model, ids, mask, self.o.generation_kwargs,
                                    pad=self.pad, output_logits=True, **cache, **kwargs)

    def _top_tokens(self, base: list[int]):
        """The ``expand`` most probable next tokens (one forward) and their log-probabilities."""
        out = self._generate(base, 1, max_new_tokens=1, do_sample=False)
        logp = torch.log_softmax(out.logits[0][0].float() / self.o.temperature, -1)
        top = logp.topk(min(self.o.expand, logp.shape[0]))
        keep = top.values > float("-inf")
        sets = [((int(t),), int(t) in self.eos) for t in top.indices[keep].tolist()]
        return sets, top.values[keep].tolist()

    def _sampled_sets(self, base: list[int], length: int):
        """``expand`` continuations of ``length`` tokens in one batched ``generate``: the first
        greedy, the others sampled at ``temperature`` from the ``top_k`` most probable tokens;
        duplicates dropped. Log-probabilities under that top-k distribution (RAIN's priors)."""
        out = self._generate(base, self.o.expand, max_new_tokens=length, do_sample=True,
                             top_k=self.o.top_k, temperature=self.o.temperature,
                             logits_processor=LogitsProcessorList([_GreedyFirstRow()]))
        generated = out.sequences[:, len(base):]
        steps = torch.stack(out.logits, 1).float() / self.o.temperature  # (rows, G, V)
        logp = torch.log_softmax(_top_k_filter(steps, self.o.top_k), -1)
        token_logp = logp.gather(-1, generated[:, :steps.shape[1], None])[..., 0]
        sets, logps, seen = [], [], set()
        for row, tokens in enumerate(generated.tolist()):
            tokens, ended = _common.until_eos(tokens, self.eos)
            if tuple(tokens) in seen:
                continue
            seen.add(tuple(tokens))
            sets.append((tuple(tokens), ended))
            logps.append(float(token_logp[row, :len(tokens)].sum()))
        return sets, logps

    # ----------------------------------------------------------------- evaluation and backup

    def _evaluate(self, path: list[_Node], children: list[_Node]) -> list[float]:
        """Every new leaf's partial answer scored in one evaluator call."""
        prefix = self.answer + self._path_tokens(path)
        texts = [_common.decode(self.tokenizer, prefix + list(child.tokens)) for child in children]
        self.evaluations += len(texts)
        return _common.scores_of("rain_generate", self.evaluator.score(self.prompt, texts),
                                 len(texts)).tolist()

    def _backup_all(self, path: list[_Node], leaves: list[_Node], values: list[float]) -> None:
        embeddings = self._path_embeddings(path, leaves) if self.o.embed is not None else None
        for i, (leaf, value) in enumerate(zip(leaves, values)):
            full = path if leaf is path[-1] else path + [leaf]
            self._backup(full, value, None if embeddings is None else embeddings[i])

    def _backup(self, path: list[_Node], value: float, embeddings) -> None:
        """Visits and running means along the path, leaf to root; with embeddings, siblings
        similar to a node on the path get ``sim_gamma * similarity`` of a visit of this value."""
        for depth in range(len(path) - 1, -1, -1):
            node = path[depth]
            node.visits += 1
            node.real_visits += 1
            node.value += (value - node.value) / node.visits
            if node.parent is None:
                continue
            self.q_low, self.q_high = min(self.q_low, node.value), max(self.q_high, node.value)
            if embeddings is not None:
                self._share_with_siblings(node, embeddings[depth - 1], value)

    def _path_embeddings(self, path: list[_Node], leaves: list[_Node]) -> list[torch.Tensor]:
        """For each leaf, the embeddings ``(depth, d)`` of the text from each non-root node of its
        path down to the leaf (RAIN embeds the path below each node), in one ``embed`` call."""
        texts = []
        for leaf in leaves:
            full = (path if leaf is path[-1] else path + [leaf])[1:]
            for start in range(len(full)):
                texts.append(_common.decode(self.tokenizer,
                                            [t for node in full[start:] for t in node.tokens]))
        vectors = torch.as_tensor(self.o.embed(texts), dtype=torch.float32).cpu()
        if vectors.dim() != 2 or vectors.shape[0] != len(texts):
            raise ValueError(f"rain_generate: embed must return a ({len(texts)}, d) tensor for "
                             f"{len(texts)} texts, got shape {tuple(vectors.shape)}")
        out, start = [], 0
        for leaf in leaves:
            depth = len(path) - 1 + (0 if leaf is path[-1] else 1)
            out.append(vectors[start:start + depth])
            start += depth
        return out

    def _share_with_siblings(self, node: _Node, embedding: torch.Tensor, value: float) -> None:
        if node.embedding is None:
            node.embedding = embedding.clone()
        else:
            node.embedding += (embedding - node.embedding) / node.real_visits
        for sibling in node.parent.children:
            if sibling is node or sibling.embedding is None:
                continue
            similarity = float(torch.nn.functional.cosine_similarity(
                node.embedding[None], sibling.embedding[None])[0])
            if similarity < self.o.sim_threshold:
                continue
            weight = similarity * self.o.sim_gamma
            before = sibling.visits
            sibling.visits += weight
            sibling.value = (sibling.value * before + weight * value) / sibling.visits

    # ----------------------------------------------------------------- one decision

    def decide(self) -> RainStep:
        """Search until the most-visited root child's value reaches the threshold after at least
        ``min_iters`` iterations, or ``max_iters``; then commit."""
        paths = []
        while True:
            paths.append(self.iterate())
            done = len(paths)
            if done >= self.o.max_iters:
                break
            if done >= self.o.min_iters and \
                    self.root.most_visited().value >= self.o.value_threshold:
                break
        children = [RainChild(c.tokens, c.prior, c.visits, c.value) for c in self.root.children]
        chosen = self.commit()
        return RainStep(chosen.tokens, len(paths), children, paths)


class _GreedyFirstRow(LogitsProcessor):
    """A logits processor that leaves only the argmax in row 0, so that sampling picks the greedy
    continuation there (RAIN's first candidate) in the same batch as the sampled ones."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        best = scores[0].argmax()
        scores[0] = float("-inf")
        scores[0, best] = 0.0
        return scores


def _top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k >= logits.shape[-1]:
        return logits
    threshold = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < threshold, float("-inf"))


# --------------------------------------------------------------------------------- public


def rain_generate(
    model: nn.Module,
    tokenizer,
    prompt: str,
    evaluator,
    *,
    max_iters: int = 50,
    min_iters: int = 6,
    value_threshold: float = 0.8,
    c_puct: float = 2.0,
    token_set_lengths: Sequence[int] = (1, 2, 4, 10),
    expand: int = 10,
    top_k: int = 15,
    temperature: float = 1.0,
    sim_gamma: float = 0.2,
    sim_threshold: float = 0.95,
    embed: Callable[[list[str]], torch.Tensor] | None = None,
    max_new_tokens: int = 64,
    generation_kwargs: dict | None = None,
) -> RainResult:
    """Generate an answer to ``prompt`` with RAIN's rewindable search; RAIN's defaults.

    Each decision runs search iterations from the root (the committed answer):

    1. *Forward*: descend by PUCT, ``argmax_c  q_c + c_puct * p_c * sqrt(N_parent) / (1 + N_c)``,
       where ``q_c`` is the child's value normalised by the smallest and largest values seen in
       the tree (starting at -1 and 1), ``N`` counts visits and the prior ``p_c`` is the
       probability of the child's token set, normalised over its siblings and mixed
       ``0.75 * p + 0.25 * uniform`` at the root.
    2. *Expand* the leaf reached into ``expand`` token sets of length
       ``token_set_lengths[depth]`` (depth counted from the start of the answer, the last length
       beyond): at length 1 the ``expand`` most probable tokens (one forward), longer ones in one
       batched ``generate`` — the greedy continuation and samples at ``temperature`` from the
       ``top_k`` most probable tokens, duplicates dropped; the prior of a set is its probability
       under that top-k distribution. A set ends at EOS; a leaf ending in EOS or at
       ``max_new_tokens`` is terminal (selected again, it is re-counted with its own value).
    3. *Evaluate* every new leaf in one ``evaluator.score(prompt, partial_answers)`` call: with a
       ``SelfEvaluator``, by default the continuous ``p_A - p_B`` (renormalised over the two
       options) averaged over both option orders, in [-1, 1]. RAIN's code thresholds each
       order's comparison instead and uses the average vote in {-1, 0, 1}, a tie counting as
       harmful: ``harmlessness_evaluator(model, tokenizer, score_rule="rain_vote")`` reproduces
       it exactly. A ``SelfEvaluator``'s prefix KV cache is kept across the search's evaluator
       calls (``reusing_prefix_across_calls()``: the search never changes the weights) and
       dropped when ``rain_generate`` returns.
    4. *Backward*: each new leaf's value updates the visit count and running-mean value of every
       node on its path; with ``embed``, each path node's embedding (the running mean of the
       embeddings of the text from it down to the evaluated leaf) is compared with its siblings',
       and a sibling with cosine similarity ``s >= sim_threshold`` gets ``sim_gamma * s`` visits of
       the same value.
    5. *Rewind* to the root and repeat, until at least ``min_iters`` iterations have run and the
       most-visited root child's value is ``>= value_threshold``, or ``max_iters`` have run.

    Then the most-visited root child (ties: the higher value, then the earlier child) is
    committed and becomes the new root, keeping its subtree; the search continues until EOS or
    ``max_new_tokens``. The committed answer's KV cache is kept and extended at each commit;
    every expansion continues it (for models whose cache can be copied; others recompute).

    Args:
        model: a transformers causal LM.
        tokenizer: its tokenizer.
        prompt: the full text the model continues (chat formatting included); also the
            ``{prompt}`` the evaluator sees.
        evaluator: a ``SelfEvaluator`` (options single tokens) or any object whose
            ``score(prompt, responses)`` returns ``N`` scores (a tensor or ``.score``).
        max_iters, min_iters: iterations per decision, ``1 <= min_iters <= max_iters``.
        value_threshold: the value at which a decision stops early.
        c_puct: exploration weight, > 0.
        token_set_lengths: token-set length at each depth, positive ints.
        expand: children per expansion, >= 1. top_k: sampling pool for sets of length > 1.
        temperature: of the expansion distribution (and the priors).
        sim_gamma, sim_threshold: the similarity update (only with ``embed``).
        embed: ``embed(texts) -> (len(texts), d)`` embeddings (RAIN: a sentence encoder), or None.
        max_new_tokens: the answer's token budget.
        generation_kwargs: extra ``generate`` arguments for the expansions (e.g.
            ``repetition_penalty``); the priors do not see them.

    Returns:
        ``RainResult(text, iterations, evaluations, forwards, token_ids, steps)``.

    Raises:
        TypeError / ValueError naming the argument for any bad argument, including an evaluator
        whose options are not single tokens under ``tokenizer``.
    """
    fn = "rain_generate"
    _common.text(fn, "prompt", prompt)
    _common.check_evaluator(fn, evaluator, tokenizer)
    options = _check_options(fn, locals())
    with _common.count_forwards(model) as counter, _common.prefix_kept_for_the_loop(evaluator):
        own_before = _evaluator_forwards(evaluator, model)
        search = _Search(model, tokenizer, prompt, evaluator, options)
        steps = []
        while not search.finished():
            steps.append(search.decide())
        own = _evaluator_forwards(evaluator, model) - own_before
    return RainResult(_common.decode(tokenizer, search.answer), sum(s.iterations for s in steps),
                      search.evaluations, counter.forwards + own, list(search.answer), steps)


def _evaluator_forwards(evaluator, model) -> int:
    """Forwards an evaluator on another model ran (those on ``model`` are counted by the hook)."""
    if getattr(evaluator, "model", model) is model:
        return 0
    return int(getattr(evaluator, "forwards", 0))


def _check_options(fn: str, arguments: dict) -> _Options:
    max_iters = _common.positive_int(fn, "max_iters", arguments["max_iters"])
    min_iters = _common.positive_int(fn, "min_iters", arguments["min_iters"])
    if min_iters > max_iters:
        raise ValueError(f"{fn}: min_iters ({min_iters}) must not exceed max_iters ({max_iters})")
    lengths = arguments["token_set_lengths"]
    if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence) or not lengths:
        raise TypeError(f"{fn}: token_set_lengths must be a non-empty sequence of positive ints, "
                        f"got {_checks.describe(lengths)}")
    lengths = tuple(_common.positive_int(fn, f"token_set_lengths[{i}]", v)
                    for i, v in enumerate(lengths))
    embed = arguments["embed"]
    if embed is not None and not callable(embed):
        raise TypeError(f"{fn}: embed must be None or a callable texts -> (N, d) tensor, got "
                        f"{_checks.describe(embed)}")
    return _Options(
        max_iters=max_iters, min_iters=min_iters,
        value_threshold=_common.real_number(fn, "value_threshold", arguments["value_threshold"]),
        c_puct=_common.real_number(fn, "c_puct", arguments["c_puct"], positive=True),
        token_set_lengths=lengths,
        expand=_common.positive_int(fn, "expand", arguments["expand"]),
        top_k=_common.positive_int(fn, "top_k", arguments["top_k"]),
        temperature=_checks.temperature(fn, arguments["temperature"]),
        sim_gamma=_common.real_number(fn, "sim_gamma", arguments["sim_gamma"], low=0.0),
        sim_threshold=_common.real_number(fn, "sim_threshold", arguments["sim_threshold"],
                                          low=-1.0, high=1.0),
        embed=embed,
        max_new_tokens=_common.positive_int(fn, "max_new_tokens", arguments["max_new_tokens"]),
        generation_kwargs=_common.generation_kwargs(
            fn, arguments["generation_kwargs"],
            reserved=("max_new_tokens", "do_sample", "top_k", "temperature", "input_ids",
                      "attention_mask", "num_return_sequences", "logits_processor", "cache",
                      "past_key_values", "output_logits", "return_dict_in_generate")),
    )
