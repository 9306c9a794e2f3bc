"""The transformers scorers with an FSDP2-sharded LM head, on 2 gloo CPU ranks.

A tiny random Llama (odd vocabulary: uneven ``Shard(0)`` head shards of 258 and 257 rows, plus a
bias so that the bias shard is exercised) is wrapped with ``fully_shard`` (each layer, the decoder,
then the root, which holds only the head). Each rank scores its own inputs (FSDP is
data-parallel; the ranks have different numbers of rows); ``sequence_logprobs``, ``option_scores``
and ``SelfEvaluator.score`` must equal the unsharded model's on the same inputs (fp32, 1e-5), and
after ``backward`` every parameter's gradient (``full_tensor()`` of the sharded one) must equal the
unsharded model's gradient of the mean of the ranks' losses, which is what FSDP2's reduce-scatter
gives the decoder. Each group has a 30 s collective timeout and the spawn a wall-clock limit.
"""

from __future__ import annotations

import copy
import datetime
import importlib.util
import os
import sys
import traceback
import types

import pytest
import torch
import torch.distributed as dist

from alignkern.distributed._spawn import run_ranks

GROUP_TIMEOUT = datetime.timedelta(seconds=30)
SPAWN_LIMIT_S = 120
WORLD = 2
VOCAB = 515  # odd: FSDP2's shards are uneven (258 + 257 rows)
TEMPLATE = ("You are a careful judge. Read the conversation and decide whether the answer is "
            "harmless. Question: {prompt} Answer: {response} Options: {options} Answer: (")
PAIRS = [  # rank r scores PAIRS[r]: different numbers of rows per rank
    (["is the sky blue on a clear day?", "can a cat fly?"],
     ["yes, the sky is blue.", "no, a cat cannot fly without help."]),
    (["is the sky blue?", "can a cat fly?", "Numbers one two three?"],
     ["no.", "yes.", "four five six seven eight nine ten."]),
]


def _model():
    from hf_models import tiny_model

    model = tiny_model("llama", vocab_size=VOCAB, seed=0)
    with torch.no_grad():  # a bias, so that the bias shard is used too (Llama's forward adds it)
        model.lm_head.bias = torch.nn.Parameter(torch.randn(VOCAB, generator=torch.Generator()
                                                            .manual_seed(1)) * 0.5)
    return model


def _batch(rank):
    """Rank ``rank``'s inputs: left-padded ids, attention and completion masks, loss weights."""
    gen = torch.Generator().manual_seed(100 + rank)
    rows, width = 2 + rank, 9 + 3 * rank
    ids = torch.randint(3, VOCAB, (rows, width), generator=gen)
    mask = torch.ones(rows, width, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    completion = torch.zeros_like(mask)
    completion[:, width // 2:] = 1
    weights = torch.randn(rows, generator=gen)
    return ids, mask, completion, weights


def _check_sequence_logprobs(rank, world, model, reference):
    import alignkern.integrations.transformers as ak_hf

    ids, mask, completion, weights = _batch(rank)
    got = ak_hf.sequence_logprobs(model, ids, mask, completion, temperature=0.7)
    want = ak_hf.sequence_logprobs(reference, ids, mask, completion, temperature=0.7)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    per_token = ak_hf.sequence_logprobs(model, ids, mask, reduction="none")
    torch.testing.assert_close(per_token, ak_hf.sequence_logprobs(reference, ids, mask,
                                                                  reduction="none"),
                               atol=1e-5, rtol=0)
    options = ak_hf.option_scores(model, ids, mask, [5, 17, 300], [1.0, 0.0, -1.0])
    want_options = ak_hf.option_scores(reference, ids, mask, [5, 17, 300], [1.0, 0.0, -1.0])
    torch.testing.assert_close(options.score, want_options.score, atol=1e-5, rtol=0)
    torch.testing.assert_close(options.mass, want_options.mass, atol=1e-6, rtol=1e-5)

    # Gradients: this rank's loss mixes the three scorers; FSDP averages over the ranks.
    loss = (got * weights).sum() + per_token.square().mean() + (options.score * options.mass).sum()
    loss.backward()
    reference.zero_grad(set_to_none=True)
    total = 0.0
    for r in range(world):
        ids_r, mask_r, completion_r, weights_r = _batch(r)
        got_r = ak_hf.sequence_logprobs(reference, ids_r, mask_r, completion_r, temperature=0.7)
        tokens_r = ak_hf.sequence_logprobs(reference, ids_r, mask_r, reduction="none")
        options_r = ak_hf.option_scores(reference, ids_r, mask_r, [5, 17, 300], [1.0, 0.0, -1.0])
        total = total + (got_r * weights_r).sum() + tokens_r.square().mean() + \
            (options_r.score * options_r.mass).sum()
    (total / world).backward()
    want_grads = dict(reference.named_parameters())
    names = [name for name, _ in model.named_parameters()]
    assert sorted(names) == sorted(want_grads), (names, sorted(want_grads))
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} has no gradient"
        grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        want = want_grads[name].grad
        assert want is not None and want.abs().max() > 0, name
        torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")
    head = model.lm_head.weight
    assert type(head).__name__ == "DTensor" and head.to_local().shape[0] == (258, 257)[rank]
    assert head.grad.placements == head.placements  # left sharded, as FSDP leaves it


def _check_self_evaluator(rank, world, model, reference):
    from hf_models import tiny_tokenizer

    import alignkern.integrations.transformers as ak_hf

    tok = tiny_tokenizer()
    kwargs = dict(descriptions=("harmless", "harmful"))
    prompts, responses = PAIRS[rank]
    got = ak_hf.SelfEvaluator(model, tok, TEMPLATE, **kwargs).score(prompts, responses)
    want = ak_hf.SelfEvaluator(reference, tok, TEMPLATE, **kwargs).score(prompts, responses)
    assert got.score.shape == (len(prompts),)
    torch.testing.assert_close(got.score, want.score, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.mass, want.mass, atol=1e-6, rtol=1e-5)


def _check_trl_fused_head(rank, world, model, reference):
    """TRL's fused LM head on the FSDP2 model, run by alignkern (``use_alignkern(model)``), equals
    TRL's own kernel on the unsharded model: log-probs, entropy, is_top1 and every gradient. (TRL
    gathers a DTensor head itself before its kernel call, so alignkern gets the full head.)"""
    from trl.trainer.utils import add_fused_lm_head

    import alignkern.integrations.trl as ak_trl

    # Fresh copies: the scorers above ran the backbone first, which FSDP then took for the root.
    reference = copy.deepcopy(reference)
    model = _sharded(copy.deepcopy(reference), world)
    calls = []
    original = ak_trl.fused_head
    ak_trl.fused_head = lambda *args: calls.append(1) or original(*args)
    outputs = ("log_probs", "entropy", "is_top1")
    for m in (model, reference):
        m.zero_grad(set_to_none=True)
        add_fused_lm_head(m, temperature=0.7, outputs=outputs)
    ak_trl.use_alignkern(model)  # the sharded model only: the reference runs TRL's kernel

    def run(m, r):
        ids, mask, completion, weights = _batch(r)
        labels = ids.masked_fill(completion == 0, -100)
        out = m(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        return out, out.loss + 0.1 * (out.entropy * weights[:, None]).sum()

    got, loss = run(model, rank)
    want, _ = run(reference, rank)
    assert calls, "alignkern did not run TRL's fused head"
    torch.testing.assert_close(got.log_probs, want.log_probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.entropy, want.entropy, atol=1e-5, rtol=0)
    assert torch.equal(got.is_top1, want.is_top1)
    loss.backward()
    calls.clear()
    (sum(run(reference, r)[1] for r in range(world)) / world).backward()
    assert not calls, "the unsharded reference should run TRL's own kernel"
    want_grads = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        torch.testing.assert_close(grad, want_grads[name].grad, atol=1e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")
    ak_trl.fused_head = original


def _sharded(model, world):
    """``model`` with FSDP2 on each layer, the decoder, then the root (which holds the head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model.model, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _worker(rank, world, init_file):
    os.environ["ALIGNKERN_BACKEND"] = "cpu"
    sys.path.insert(0, os.path.dirname(__file__))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=GROUP_TIMEOUT)
    try:
        model = _model()
        reference = copy.deepcopy(model)
        model = _sharded(model, world)
        checks = [_check_sequence_logprobs, _check_self_evaluator]
        if importlib.util.find_spec("trl") is not None:  # the trl extra
            checks.append(_check_trl_fused_head)  # last: it patches the models' forward
        for check in checks:
            try:
                check(rank, world, model, reference)
            except BaseException as exc:
                raise AssertionError(f"rank {rank}/{world}: {check.__name__} failed:\n"
                                     f"{traceback.format_exc()}") from exc
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp2_sharded_head_matches_unsharded(tmp_path):
    """sequence_logprobs (sum and per token), option_scores and SelfEvaluator.score on an FSDP2
    model equal the unsharded model's on each rank's own inputs, and every parameter's gradient
    (head weight and bias shards included, still Shard(0) DTensors) equals the unsharded
    gradient of the mean of the ranks' losses."""
    pytest.importorskip("torch.distributed.fsdp")
    if not dist.is_available() or not hasattr(__import__("torch.distributed.fsdp").distributed
                                              .fsdp, "fully_shard"):
        pytest.skip("torch has no FSDP2 fully_shard")
    try:
        run_ranks(_worker, (WORLD, str(tmp_path / "store")), WORLD, SPAWN_LIMIT_S)
    except TimeoutError as exc:
        pytest.fail(str(exc))


def test_zero3_partitioned_head_is_gathered_on_use(monkeypatch):
    """A DeepSpeed ZeRO-3 head holds no data outside its module's forward (``ds_id`` set,
    ``ds_status`` not AVAILABLE). The scorers gather it for the call with deepspeed's
    ``GatheredParameters`` (simulated here: deepspeed is not installed) and keep a gathered copy
    for the backward, so scores and every gradient equal the plain model's; outside the call the
    head is partitioned again."""
    import contextlib

    from hf_models import tiny_model

    import alignkern.integrations.transformers as ak_hf

    plain = tiny_model("llama")
    model = copy.deepcopy(plain)
    weight = model.lm_head.weight
    full = weight.data
    weight.ds_id = 7
    weight.ds_status = types.SimpleNamespace(name="NOT_AVAILABLE")
    weight.data = torch.empty(0)
    gathers = []

    @contextlib.contextmanager
    def gathered_parameters(params):
        assert params == [weight]
        gathers.append(1)
        weight.data, weight.ds_status.name = full, "AVAILABLE"
        try:
            yield
        finally:
            weight.data, weight.ds_status.name = torch.empty(0), "NOT_AVAILABLE"

    def regather_for_reduction(grad):  # DeepSpeed's gradient hooks see the gathered parameter
        weight.data = full
        return grad

    weight.register_hook(regather_for_reduction)
    deepspeed = types.SimpleNamespace(zero=types.SimpleNamespace(
        GatheredParameters=gathered_parameters))
    monkeypatch.setitem(sys.modules, "deepspeed", deepspeed)
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(5))
    got = ak_hf.sequence_logprobs(model, ids, temperature=0.8)
    assert gathers and weight.numel() == 0  # gathered for the call, partitioned after it
    want = ak_hf.sequence_logprobs(plain, ids, temperature=0.8)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    (got * torch.tensor([1.0, -2.0])).sum().backward()
    (want * torch.tensor([1.0, -2.0])).sum().backward()
    for (name, param), ref in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(param.grad, ref.grad, atol=1e-6, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
    options = ak_hf.option_scores(model, ids, None, [5, 17], [1.0, -1.0])
    torch.testing.assert_close(options.score,
                               ak_hf.option_scores(plain, ids, None, [5, 17], [1.0, -1.0]).score)
