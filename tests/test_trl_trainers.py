"""TRL's trainers on alignkern (``alignkern.integrations.trl.use_alignkern``): real training runs.

Each test trains a tiny random model for a few steps with one of TRL's trainers twice, stock and
with ``use_alignkern``, from the same weights, data and seed, and compares what the trainer logs
at every step. A spy on both kernels (TRL's ``ChunkedLogProbFunction.forward`` and alignkern's
``fused_head``) checks that each run went through the kernel it claims, so a hook that silently
does nothing fails.

Settings, the same for every trainer unless a test says otherwise: CPU, fp32 (``bf16=False``;
TRL's configs default to bf16), ``report_to=[]``, no saving, seed 0, one torch thread, TRL's
defaults otherwise (AdamW, gradient checkpointing, ``max_grad_norm=1``, linear decay). The tiny
models have no dropout (their configs' dropout probabilities are 0, checked) and TRL disables
dropout anyway.

Comparison in fp32 (``_assert_same_logs``): the same logged keys at every step; the loss and the
gradient norm to 1e-6 relative; every other metric to 1e-6 relative to its own size or, for the
metrics that are differences of larger numbers the trainer computed (rewards, KL, mean logits,
GRPO's policy loss), to 1e-6 relative to the size of those numbers (``_preference_scales``,
``GRPO_SCALES``, ``RLOO_SCALES``); wall-clock metrics are not compared (``_TIMING``). Both runs
are deterministic (a rerun of either gives the same bits), so what differs is the kernels.

Under bf16 autocast the two kernels round at different places (TRL rounds each logits tile to
bf16; alignkern keeps the logits in fp32 and hands back bf16-rounded gradients at autocast's
cast), so the bound there is measured, not chosen: see ``test_dpo_bf16_within_stock_noise``.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

trl = pytest.importorskip("trl")

import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from hf_models import tiny_model, tiny_tokenizer  # noqa: E402
from trl.kernels import chunked_logprob  # noqa: E402

import alignkern.integrations.trl as ak_trl  # noqa: E402
from alignkern.integrations.trl import use_alignkern  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-6
# Wall-clock measurements, different in every run.
_TIMING = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second"}

PROMPTS = ["Question: is the sky blue on a clear day?", "Question: can a cat fly?",
           "Numbers one two three", "You are a careful judge. Read the conversation"]
REJECTED = [" Answer: no, never.", " Answer: yes, a cat can fly.", " seven eight",
            " Options: (B) harmful."]


# ----------------------------------------------------------------------------- helpers


class _Recorder(transformers.TrainerCallback):
    """Every dict the trainer logs, in order."""

    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls to TRL's own kernel and to alignkern's head, wherever they come from."""
    counts = {"trl": 0, "alignkern": 0, "autocast": set()}
    trl_forward = chunked_logprob.ChunkedLogProbFunction.forward
    alignkern_head = ak_trl.fused_head

    def counted_trl(*args, **kwargs):
        counts["trl"] += 1
        counts["autocast"].add(torch.is_autocast_enabled("cpu"))
        return trl_forward(*args, **kwargs)

    def counted_alignkern(*args, **kwargs):
        counts["alignkern"] += 1
        counts["autocast"].add(torch.is_autocast_enabled("cpu"))
        return alignkern_head(*args, **kwargs)

    monkeypatch.setattr(chunked_logprob.ChunkedLogProbFunction, "forward",
                        staticmethod(counted_trl))
    monkeypatch.setattr(ak_trl, "fused_head", counted_alignkern)
    return counts


def _greedy(model, prompt: str, tokens: int) -> str:
    """The model's own greedy continuation of ``prompt``, so that some completion tokens are the
    model's top-1 and the accuracy metrics (``is_top1``) are not all zero."""
    tokenizer = tiny_tokenizer()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:])


@functools.cache
def _chosen(family: str) -> tuple[str, ...]:
    model = tiny_model(family)
    return tuple(_greedy(model, p, 6) for p in PROMPTS)


def _preference_data(family: str) -> Dataset:
    return Dataset.from_dict({"prompt": PROMPTS, "chosen": list(_chosen(family)),
                              "rejected": REJECTED})


def _config(config_cls, tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, bf16=False,
                    seed=0, save_strategy="no", logging_steps=1, disable_tqdm=True,
                    dataloader_num_workers=0, per_device_train_batch_size=2, max_steps=3,
                    learning_rate=1e-4)
    settings.update(overrides)
    return config_cls(**settings)


def _train(make_trainer, hook: str | None, spy=None) -> list[dict]:
    """Build the trainer with ``make_trainer(callbacks)`` and train it: ``hook`` None (stock),
    ``"global"`` (``use_alignkern()`` before the trainer is built) or ``"scoped"``
    (``use_alignkern(trainer)`` once it is built). Returns the logged dicts; with ``spy``, checks
    that every fused-head call ran on the kernel the run is about."""
    transformers.set_seed(0)
    recorder = _Recorder()
    before = {k: spy[k] for k in ("trl", "alignkern")} if spy is not None else None
    if hook == "global":
        with use_alignkern():
            make_trainer([recorder]).train()
    else:
        trainer = make_trainer([recorder])
        if hook == "scoped":
            with use_alignkern(trainer):
                trainer.train()
        else:
            trainer.train()
    if spy is not None:
        calls = {k: spy[k] - before[k] for k in before}
        expected, other = ("trl", "alignkern") if hook is None else ("alignkern", "trl")
        assert calls[expected] > 0 and calls[other] == 0, (hook, calls)
    return recorder.logs


def _steps(logs: list[dict]) -> list[dict]:
    return [log for log in logs if "loss" in log]


@functools.cache
def _logit_rms(family: str) -> float:
    """The root-mean-square logit of the tiny model on the prompts (the model's own head, with
    its softcap or logit scale)."""
    ids = tiny_tokenizer()(PROMPTS, return_tensors="pt", padding=True).input_ids
    with torch.no_grad():
        return float(tiny_model(family)(ids).logits.pow(2).mean().sqrt())


def _logps(log: dict) -> float:
    return abs(log.get("logps/chosen", 0.0)) + abs(log.get("logps/rejected", 0.0))


def _preference_scales(beta: float, family: str) -> dict:
    """DPO and KTO: rewards = beta * (log-prob sum - reference log-prob sum), so their error is
    relative to beta times those sums; ``logits/*`` are means over the vocabulary that cancel to
    ~0.01 while each logit is O(1): relative to the logits' size; KTO's ``kl`` is a mean of
    (log-prob sum - reference log-prob sum) over mismatched completions."""
    rms = _logit_rms(family)
    return {"rewards/chosen": lambda log: beta * _logps(log),
            "rewards/rejected": lambda log: beta * _logps(log),
            "rewards/margins": lambda log: beta * _logps(log),
            "logits/chosen": lambda log: rms,
            "logits/rejected": lambda log: rms,
            "kl": _logps}


# GRPO: ``kl`` is the k3 estimator exp(d) - d - 1 of d = ref log-prob - log-prob; an error e in d
# moves it by about |d| e, |d| ~ sqrt(2 kl), and e is relative to the log-probs, whose size on
# sampled tokens is the entropy of the distribution they were sampled from. ``policy_loss`` is a
# mean of -advantage * ratio terms (advantages normalised per group, ratios near 1) that cancels
# to ~0: relative to 1.
GRPO_SCALES = {"kl": lambda log: math.sqrt(2 * abs(log["kl"])) * log["entropy"],
               "policy_loss": lambda log: 1.0}
# RLOO: ``kl`` is a mean of per-token (log-prob - ref log-prob), of the size of the entropy.
RLOO_SCALES = {"kl": lambda log: log["entropy"]}


def _max_rel(stock: list[dict], ours: list[dict], scales: dict) -> dict[str, float]:
    """Per metric, the largest |ours - stock| over the steps relative to its scale (``scales``,
    else the metric's own size)."""
    out = {}
    for s, o in zip(stock, ours):
        for key in s:
            if key in _TIMING or not isinstance(s[key], (int, float)):
                continue
            scale = scales[key](s) if key in scales else abs(s[key])
            diff = abs(o[key] - s[key])
            rel = 0.0 if diff == 0 else diff / scale if scale else math.inf
            out[key] = max(out.get(key, 0.0), rel)
    return out


def _assert_same_logs(stock: list[dict], ours: list[dict], scales: dict | None = None) -> dict:
    assert len(stock) == len(ours) and len(_steps(stock)) >= 2
    for s, o in zip(stock, ours):
        assert set(s) == set(o)
    rel = _max_rel(stock, ours, scales or {})
    assert rel["loss"] <= RTOL and rel["grad_norm"] <= RTOL, rel
    bad = {k: v for k, v in rel.items() if v > RTOL}
    assert not bad, bad
    print("max relative differences:", {k: f"{v:.1e}" for k, v in sorted(rel.items())})
    return rel


def _changes(logs: list[dict], key: str = "loss") -> bool:
    values = [log[key] for log in _steps(logs)]
    return len(set(values)) == len(values)


# ----------------------------------------------------------------------------- DPO


def _dpo(tmp_path, family="llama", **overrides):
    """A DPO trainer factory: policy and reference model the same tiny model, 4 pairs, batches of
    2 pairs, sequences of at most 40 tokens. The config is built with each trainer (building
    one resets accelerate's mixed-precision state, so fp32 and bf16 runs can follow each other)."""
    from trl import DPOConfig, DPOTrainer

    data = _preference_data(family)

    def make(callbacks):
        args = _config(DPOConfig, tmp_path, max_length=40, **overrides)
        policy, ref = tiny_model(family), tiny_model(family)
        return DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=data,
                          processing_class=tiny_tokenizer(), callbacks=callbacks)

    return make


def test_tiny_models_have_no_dropout():
    for family in ("llama", "gemma2", "cohere"):
        model = tiny_model(family)
        probs = {k: v for k, v in model.config.to_dict().items()
                 if "dropout" in k and isinstance(v, float)}
        assert probs and not any(probs.values()), (family, probs)
        assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


@pytest.mark.parametrize("family, hook, overrides", [
    ("llama", "scoped", {}),
    # final_logit_softcapping = 2, and the WPO weights (log_sum_sq_probs) in the loss
    ("gemma2", "global", {"use_weighting": True}),
    # logit_scale = 0.25
    ("cohere", "scoped", {}),
], ids=["llama-scoped", "gemma2-softcap-wpo-global", "cohere-logit_scale-scoped"])
def test_dpo_matches_stock(tmp_path, spy, family, hook, overrides):
    from trl import DPOConfig

    make = _dpo(tmp_path, family, **overrides)
    stock = _train(make, None, spy)
    ours = _train(make, hook, spy)
    assert _changes(stock) and _steps(stock)[-1]["mean_token_accuracy"] > 0
    _assert_same_logs(stock, ours, _preference_scales(DPOConfig.beta, family))


# ----------------------------------------------------------------------------- GRPO and RLOO


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """The tiny Llama saved to disk: GRPO and RLOO build their reference model (beta > 0) from the
    policy's path."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    return str(path)


class _VowelReward:
    """A deterministic reward (vowels per completion) that records the completions it scores, so
    that two runs can be checked to have trained on the same samples."""

    __name__ = "vowels"

    def __init__(self):
        self.completions: list[str] = []

    def __call__(self, completions, **kwargs):
        self.completions += completions
        return [float(sum(c in "aeiou" for c in text)) for text in completions]


def _online(trainer_cls, config_cls, tmp_path, model_dir, **overrides):
    """GRPO/RLOO on prompts: sampling at temperature 0.7 (TRL's fused head divides the logits by
    it), 2 generations of at most 5 tokens per prompt, a KL term against the reference model,
    two optimisation steps per generation batch (so the old log-probs are scored too)."""
    args = _config(config_cls, tmp_path, per_device_train_batch_size=4, num_generations=2,
                   max_completion_length=5, temperature=0.7, beta=0.04, num_iterations=2,
                   **overrides)
    data = Dataset.from_dict({"prompt": PROMPTS})
    rewards = []

    def make(callbacks):
        rewards.append(_VowelReward())
        return trainer_cls(model=model_dir, reward_funcs=rewards[-1], args=args,
                           train_dataset=data, processing_class=tiny_tokenizer(),
                           callbacks=callbacks)

    return make, rewards


def test_grpo_matches_stock(tmp_path, spy, llama_dir):
    from trl import GRPOConfig, GRPOTrainer

    # entropy_coef: the entropy's gradient goes through the fused head's backward
    make, rewards = _online(GRPOTrainer, GRPOConfig, tmp_path, llama_dir, entropy_coef=0.01)
    stock = _train(make, None, spy)
    ours = _train(make, "scoped", spy)
    assert rewards[0].completions and rewards[0].completions == rewards[1].completions
    assert _changes(stock)
    _assert_same_logs(stock, ours, GRPO_SCALES)


def test_rloo_matches_stock(tmp_path, spy, llama_dir):
    from trl import RLOOConfig, RLOOTrainer

    make, rewards = _online(RLOOTrainer, RLOOConfig, tmp_path, llama_dir, max_steps=2)
    stock = _train(make, None, spy)
    ours = _train(make, "global", spy)
    assert rewards[0].completions and rewards[0].completions == rewards[1].completions
    _assert_same_logs(stock, ours, RLOO_SCALES)


# ----------------------------------------------------------------------------- SFT and KTO


def test_sft_matches_stock(tmp_path, spy):
    from trl import SFTConfig, SFTTrainer

    args = _config(SFTConfig, tmp_path, max_length=40, max_steps=2)
    data = Dataset.from_dict({"prompt": PROMPTS, "completion": list(_chosen("llama"))})

    def make(callbacks):
        return SFTTrainer(model=tiny_model("llama"), args=args, train_dataset=data,
                          processing_class=tiny_tokenizer(), callbacks=callbacks)

    stock = _train(make, None, spy)
    ours = _train(make, "scoped", spy)
    assert _steps(stock)[0]["mean_token_accuracy"] > 0
    _assert_same_logs(stock, ours)


def test_kto_matches_stock(tmp_path, spy):
    from trl import KTOConfig, KTOTrainer

    args = _config(KTOConfig, tmp_path, max_length=40, max_steps=2)
    # desirable and undesirable examples alternate, so that a batch of 2 can hold both
    data = Dataset.from_dict({"prompt": [p for p in PROMPTS for _ in range(2)],
                              "completion": [c for pair in zip(_chosen("llama"), REJECTED)
                                             for c in pair],
                              "label": [True, False] * 4})

    def make(callbacks):
        return KTOTrainer(model=tiny_model("llama"), ref_model=tiny_model("llama"), args=args,
                          train_dataset=data, processing_class=tiny_tokenizer(),
                          callbacks=callbacks)

    stock = _train(make, None, spy)
    ours = _train(make, "scoped", spy)
    _assert_same_logs(stock, ours, _preference_scales(args.beta, "llama"))


# ----------------------------------------------------------------------------- bf16 autocast


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_dpo_bf16_within_stock_noise(tmp_path, spy, monkeypatch, family):
    """DPO under bf16 autocast (``bf16=True``: accelerate wraps the models' forwards in
    ``torch.autocast("cpu", torch.bfloat16)``, checked by the spy) against stock TRL.

    The issue's bound is the difference between two stock runs that differ only in chunk size
    (32768, the default, and 64). On CPU that difference is (near) zero: TRL's bf16 GEMM gives
    each logit the same bf16 value whatever the tile's width, so only fp32 reassociation is left
    (measured: 0 to 1e-7 on gemma2, up to 1e-2 in the gradient norm on llama). alignkern rounds
    at other places (logits kept in fp32; gradients handed back in bf16 through autocast's cast,
    where TRL accumulates them in fp32), so no bf16 implementation but TRL's own can stay under
    that. The bound is therefore the size of stock's bf16 noise: the larger of the chunk-size
    difference and stock's distance to the same training in fp32, as a running maximum over the
    steps (after step 1 the differences are trajectories', and one step's can be ~0 by chance),
    times 2 (triangle inequality through the fp32 run: an implementation as accurate as stock is
    within twice stock's error of it). Step 1, where every run starts from the same weights,
    must give DPO's log 2 exactly: policy and reference through the same kernel."""
    import trl.trainer.utils as trl_utils

    runs = {}
    make = _dpo(tmp_path, family, bf16=True)
    spy["autocast"].clear()
    runs["stock"] = _steps(_train(make, None, spy))
    runs["alignkern"] = _steps(_train(make, "global", spy))
    assert spy["autocast"] == {True}
    with monkeypatch.context() as patch:
        patch.setattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 64)
        runs["stock chunk 64"] = _steps(_train(make, None, spy))
    spy["autocast"].clear()
    runs["stock fp32"] = _steps(_train(_dpo(tmp_path, family), None, spy))
    assert spy["autocast"] == {False}

    assert runs["alignkern"][0]["loss"] == runs["stock"][0]["loss"] == pytest.approx(math.log(2))
    for key in ("loss", "grad_norm"):
        stock = [log[key] for log in runs["stock"]]
        diff = {name: [abs(log[key] - s) for log, s in zip(logs, stock)]
                for name, logs in runs.items() if name != "stock"}
        noise = [max(diff["stock chunk 64"][t], diff["stock fp32"][t])
                 for t in range(len(stock))]
        bound = [2 * max(noise[:t + 1]) for t in range(len(stock))]
        print(f"{family} {key}: " + "; ".join(
            f"{name} {' '.join(f'{d:.1e}' for d in ds)}" for name, ds in diff.items()))
        assert all(d <= b for d, b in zip(diff["alignkern"], bound)), (key, diff, bound)
        assert any(d > 0 for d in diff["alignkern"])  # bf16 did change something


# ----------------------------------------------------------------------------- the hook's forms


def _fused_call(model) -> torch.Tensor:
    """What TRL's trainers do: the patched forward with ``fused_lm_head=True``."""
    batch = tiny_tokenizer()(PROMPTS[:2], padding=True, return_tensors="pt")
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    with torch.no_grad():
        return model(**batch, labels=labels, fused_lm_head=True).log_probs


def _calls(spy, fn) -> tuple[dict, object]:
    before = {k: spy[k] for k in ("trl", "alignkern")}
    value = fn()
    return {k: spy[k] - before[k] for k in before}, value


def test_scoped_hook_on_a_built_trainer_and_undo(tmp_path, spy):
    trainer = _dpo(tmp_path)([])
    models = (trainer.model, trainer.ref_model)
    forwards = [vars(m)["forward"] for m in models]
    stock = [_fused_call(m) for m in models]

    hook = use_alignkern(trainer)
    for model, expected in zip(models, stock):
        calls, ours = _calls(spy, lambda m=model: _fused_call(m))
        assert calls == {"trl": 0, "alignkern": 1}
        torch.testing.assert_close(ours, expected, rtol=RTOL, atol=1e-6)
    # another model of the process is not in scope
    other = _dpo(tmp_path)([])
    assert _calls(spy, lambda: _fused_call(other.model))[0] == {"trl": 1, "alignkern": 0}

    hook.undo()
    assert [vars(m)["forward"] for m in models] == forwards
    for model in models:
        assert _calls(spy, lambda m=model: _fused_call(m))[0] == {"trl": 1, "alignkern": 0}
    hook.undo()  # a second undo does nothing


def test_global_hook_reaches_trainers_built_before_and_after(tmp_path, spy):
    before = _dpo(tmp_path)([])
    with use_alignkern():
        after = _dpo(tmp_path)([])
        for model in (before.model, before.ref_model, after.model, after.ref_model):
            assert _calls(spy, lambda m=model: _fused_call(m))[0] == {"trl": 0, "alignkern": 1}
    for model in (before.model, after.model):
        assert _calls(spy, lambda m=model: _fused_call(m))[0] == {"trl": 1, "alignkern": 0}


def test_use_alignkern_rejects_a_model_without_fused_head():
    with pytest.raises(ValueError, match="has no TRL fused LM head"):
        use_alignkern(tiny_model("llama"))
    with pytest.raises(ValueError, match="must be a TRL trainer, a model or None"):
        use_alignkern(object())


def test_scoped_hook_reaches_the_reference_model_under_bf16(tmp_path, spy):
    """Under mixed precision accelerate wraps the reference model's forward (prepared in the
    trainer's __init__) around TRL's fused one; use_alignkern(trainer) still reaches it."""
    trainer = _dpo(tmp_path, bf16=True)([])
    with use_alignkern(trainer):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            calls, _ = _calls(spy, lambda: _fused_call(trainer.ref_model))
    assert calls == {"trl": 0, "alignkern": 1}
