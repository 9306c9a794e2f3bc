"""The DPO training-step benchmark behind ``alignkern bench --trl``: one step of TRL's
``DPOTrainer`` (policy and reference forward, backward, gradient clipping, optimizer step) with
TRL's fused LM head stock and on alignkern (``alignkern.integrations.trl.use_alignkern``), on the
same model and the same batches.

The model is a random Llama (``alignkern.loops.tiny``) whose LM head dominates a step: V = 32000,
H = 256, 2 layers, DPO pairs of 256-token sequences (64 prompt + 192 completion tokens, random
ids over the whole vocabulary), 2 pairs per step. The trainer is TRL's own with one change: its
dataset arrives tokenized (``prompt_ids``, ``chosen_ids``, ``rejected_ids``), so the tokenizing
map is skipped; collation, loss, metrics, AdamW and the training loop are TRL's and transformers'.
TRL's defaults otherwise (gradient checkpointing on, fp32 on a CPU; on a GPU bf16 autocast).

How it is measured:

* One trainer, one model: the two configurations take turns step by step (A B B A A B ...), so
  that a load spike from another process hits both and both see the same kind of weights. A
  callback switches alignkern on (``use_alignkern()``) at the start of an alignkern step and off
  at its end, and counts which kernel each fused-head call ran on (so a row whose kernel did not
  run cannot pass unnoticed).
* Time: wall time from the trainer's ``on_step_begin`` to its ``on_step_end`` (the batch is
  already collated), the median over the timed steps of each configuration, after ``warmup``
  steps of each (the first allocates AdamW's state).
* Peak memory: the rise during the step above its start. CUDA: ``torch.cuda.max_memory_allocated``.
  CPU: the peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` before each step)
  minus the resident set at the step's start, with glibc serving every allocation of 1 MiB or more
  by its own ``mmap`` so that a freed tensor leaves the resident set at once (the method of
  ``alignkern.loops.cost``, as ``bench --loops``): each step's transient tensors (activations, the
  head's logits tiles, gradients) are counted, the weights and AdamW's state are not. The largest
  over the timed steps. That malloc setting holds for both configurations' timings too (it costs
  a page fault per fresh page of every large tensor; glibc mmaps TRL's 128 MiB tiles anyway).

    alignkern bench --trl [--quick] [--device cpu|cuda] [--out DIR]
    python -m alignkern.bench.trl_step [--quick] [--device cpu|cuda] [--threads N] [--out DIR]
"""

from __future__ import annotations

import copy
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

STOCK = "stock TRL"
ALIGNKERN = "alignkern"
PROVIDERS = (STOCK, ALIGNKERN)

# The real size and --quick's.
SIZES = {
    "default": dict(vocab_size=32000, hidden_size=256, num_layers=2, intermediate_size=688,
                    prompt_len=64, completion_len=192, pairs=2, warmup=1, repeats=3),
    "quick": dict(vocab_size=4096, hidden_size=64, num_layers=1, intermediate_size=128,
                  prompt_len=8, completion_len=24, pairs=1, warmup=1, repeats=1),
}


def _schedule(warmup: int, repeats: int) -> list[str]:
    """The provider of each step: ABBA blocks, the first ``warmup`` of each provider untimed."""
    order = []
    for i in range(warmup + repeats):
        order += list(PROVIDERS) if i % 2 == 0 else list(reversed(PROVIDERS))
    return order


def _dataset(vocab_size: int, prompt_len: int, completion_len: int, n: int, seed: int = 0):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)

    def ids(length):
        return torch.randint(3, vocab_size, (n, length), generator=g).tolist()

    return Dataset.from_dict({"prompt_ids": ids(prompt_len), "chosen_ids": ids(completion_len),
                              "rejected_ids": ids(completion_len)})


def _trainer_class():
    from trl import DPOTrainer

    class PreTokenizedDPOTrainer(DPOTrainer):
        """TRL's DPOTrainer on a dataset that is tokenized already."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return PreTokenizedDPOTrainer


class _KernelCounter:
    """Counts the fused-head calls that ran on TRL's kernel and on alignkern's while installed."""

    def __init__(self):
        self.counts = {STOCK: 0, ALIGNKERN: 0}

    def __enter__(self):
        from trl.kernels import chunked_logprob

        from ..integrations import trl as ak_trl

        self._trl_class, self._ak_module = chunked_logprob.ChunkedLogProbFunction, ak_trl
        self._trl_forward = vars(self._trl_class)["forward"]
        self._ak_head = ak_trl.fused_head
        trl_forward, ak_head = self._trl_forward.__func__, self._ak_head

        def counted_trl(*args, **kwargs):
            self.counts[STOCK] += 1
            return trl_forward(*args, **kwargs)

        def counted_ak(*args, **kwargs):
            self.counts[ALIGNKERN] += 1
            return ak_head(*args, **kwargs)

        self._trl_class.forward = staticmethod(counted_trl)
        ak_trl.fused_head = counted_ak
        return self

    def __exit__(self, *exc):
        self._trl_class.forward = self._trl_forward
        self._ak_module.fused_head = self._ak_head


def _meter_class():
    from transformers import TrainerCallback

    from ..integrations.trl import use_alignkern
    from ..loops import cost

    class StepMeter(TrainerCallback):
        """Switches alignkern on for its steps, and times and measures every step."""

        def __init__(self, device: torch.device, schedule: list[str], counter: _KernelCounter):
            self.device, self.schedule, self.counter = device, schedule, counter
            self.steps: list[dict] = []
            self.rss = device.type == "cpu" and cost._resident_set_ready()

        def on_step_begin(self, args, state, control, **kwargs):
            self.provider = self.schedule[state.global_step]
            self.hook = use_alignkern() if self.provider == ALIGNKERN else None
            self.calls = dict(self.counter.counts)
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                self.before = torch.cuda.memory_allocated(self.device)
            elif self.rss:
                cost._LIBC[0].malloc_trim(0)
                cost._reset_peak()
                self.before = cost._status_kib("VmRSS") * 1024
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            wall = time.perf_counter() - self.start
            if self.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(self.device) - self.before
            elif self.rss:
                peak = max(0, cost._status_kib("VmHWM") * 1024 - self.before)
            else:
                peak = None
            if self.hook is not None:
                self.hook.undo()
            calls = {k: self.counter.counts[k] - self.calls[k] for k in PROVIDERS}
            self.steps.append({"provider": self.provider, "wall_s": wall, "peak_bytes": peak,
                               "calls": calls})

    return StepMeter


def run_trl_benchmark(device: str | torch.device | None = None, *, quick: bool = False,
                      out_dir: str | os.PathLike | None = None, print_report: bool = False,
                      **sizes) -> list[dict]:
    """Time one DPO training step through TRL's DPOTrainer, stock and with ``use_alignkern``.
    Callable with no arguments.

    Returns two result rows (dicts), ``stock TRL`` and ``alignkern``, each with ``case``
    (``dpo_step``), ``config``, ``provider``, ``device``, ``threads``, ``ms`` (median wall time of
    a step), ``ms_min``, ``ms_max``, ``steps`` (timed steps), ``peak_mib`` (the largest rise in
    memory during a step: CUDA allocated bytes, CPU the resident set; None where it cannot be
    read), ``head_calls`` (fused-head calls per step on the row's own kernel) and
    ``other_kernel_calls`` (on the other kernel: 0); the alignkern row also has ``ratio``
    (stock ms / alignkern ms) and ``memory_ratio`` (stock peak / alignkern peak).

    Args:
        device: ``"cpu"``, ``"cuda"`` or a ``torch.device`` (default: cuda if present).
        quick: a small model (V = 4096, H = 64, 1 layer, 32 tokens, 1 pair, 1 timed step each).
        out_dir: where to write the rows as ``<device>-trl.csv``, or None.
        print_report: print ``format_report(rows)``.
        **sizes: override ``SIZES``' entries: ``vocab_size``, ``hidden_size``, ``num_layers``,
            ``intermediate_size``, ``prompt_len``, ``completion_len``, ``pairs``, ``warmup``,
            ``repeats``.
    """
    from transformers import PrinterCallback
    from trl import DPOConfig

    from ..loops import cost, tiny

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    unknown = set(sizes) - set(SIZES["default"])
    if unknown:
        raise TypeError(f"run_trl_benchmark: unknown size(s) {sorted(unknown)}")
    size = {**SIZES["quick" if quick else "default"], **sizes}
    if device.type == "cpu":
        cost._resident_set_ready()  # before the model is built: it affects later allocations
    heads = 4
    model = tiny.tiny_model(vocab_size=size["vocab_size"], hidden_size=size["hidden_size"],
                            num_layers=size["num_layers"], num_heads=heads, num_kv_heads=heads,
                            intermediate_size=size["intermediate_size"], device=device)
    ref_model = copy.deepcopy(model)
    schedule = _schedule(size["warmup"], size["repeats"])
    data = _dataset(size["vocab_size"], size["prompt_len"], size["completion_len"],
                    n=2 * size["pairs"])
    counter = _KernelCounter()
    meter = _meter_class()(device, schedule, counter)
    with tempfile.TemporaryDirectory() as tmp, counter:
        args = DPOConfig(output_dir=tmp, report_to=[], use_cpu=device.type == "cpu",
                         bf16=device.type == "cuda", seed=0, save_strategy="no",
                         logging_steps=len(schedule) + 1, disable_tqdm=True,
                         dataloader_num_workers=0, per_device_train_batch_size=size["pairs"],
                         max_steps=len(schedule), max_length=None, learning_rate=1e-5)
        trainer = _trainer_class()(model=model, ref_model=ref_model, args=args,
                                   train_dataset=data, processing_class=tiny.tiny_tokenizer(),
                                   callbacks=[meter])
        trainer.remove_callback(PrinterCallback)  # disable_tqdm's replacement prints every log
        trainer.train()
    tokens = size["prompt_len"] + size["completion_len"]
    config = (f"Llama V={size['vocab_size']} H={size['hidden_size']} L={size['num_layers']} "
              f"{'bf16 autocast' if args.bf16 else 'fp32'}, {size['pairs']} pairs x 2 x "
              f"{tokens} tokens ({size['prompt_len']} prompt), AdamW, "
              f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}")
    from .loops import report_rows

    return report_rows(_rows(meter.steps, size["warmup"], config, device), device, out_dir,
                       print_report, format_report, "trl")


def _rows(steps: list[dict], warmup: int, config: str, device: torch.device) -> list[dict]:
    from .loops import _device_name

    rows = []
    for provider in PROVIDERS:
        mine = [s for s in steps if s["provider"] == provider]
        timed = mine[warmup:]
        if not timed:
            raise RuntimeError(f"trl_step: no timed {provider} step ran")
        walls = [s["wall_s"] * 1e3 for s in timed]
        peaks = [s["peak_bytes"] for s in timed if s["peak_bytes"] is not None]
        other = ALIGNKERN if provider == STOCK else STOCK
        rows.append({
            "case": "dpo_step", "config": config, "provider": provider,
            "device": _device_name(device), "threads": torch.get_num_threads(),
            "ms": statistics.median(walls), "ms_min": min(walls), "ms_max": max(walls),
            "steps": len(timed), "peak_mib": max(peaks) / 2**20 if peaks else None,
            "head_calls": statistics.mean(s["calls"][provider] for s in mine),
            "other_kernel_calls": sum(s["calls"][other] for s in mine),
        })
    stock, ours = rows
    ours["ratio"] = stock["ms"] / ours["ms"]
    ours["memory_ratio"] = (stock["peak_mib"] / ours["peak_mib"]
                            if stock["peak_mib"] and ours["peak_mib"] else None)
    return rows


def write_csv(rows: list[dict], device: str | torch.device, out_dir: str | os.PathLike) -> Path:
    """Write ``rows`` to ``out_dir/<device>-trl.csv`` (the folder is created); returns the path."""
    from .loops import write_csv as write_rows

    return write_rows(rows, device, out_dir, name="trl")


def format_report(rows: list[dict]) -> str:
    """A plain-text table of ``run_trl_benchmark``'s rows and the comparison."""
    from .loops import _fmt

    columns = (("provider", "provider"), ("ms", "ms/step"), ("ms_min", "min"),
               ("ms_max", "max"), ("steps", "steps"), ("peak_mib", "peak MiB"),
               ("head_calls", "head calls/step"), ("ratio", "speed-up"),
               ("memory_ratio", "memory ratio"))
    lines = []
    if rows:
        lines += [f"TRL DPO training step on {rows[0]['device']}", f"dpo_step: {rows[0]['config']}"]
    cells = [[_fmt(r.get(key)) for key, _ in columns] for r in rows]
    widths = [max(len(title), *(len(c[i]) for c in cells)) for i, (_, title) in enumerate(columns)]
    lines.append("  " + "  ".join(t.ljust(w) for (_, t), w in zip(columns, widths)))
    lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(c, widths)) for c in cells]
    by = {r["provider"]: r for r in rows}
    if STOCK in by and ALIGNKERN in by:
        stock, ours = by[STOCK], by[ALIGNKERN]
        lines.append("")
        line = (f"alignkern: {ours['ms']:.0f} ms per step vs {stock['ms']:.0f} ms stock "
                f"({ours['ratio']:.2f}x the speed)")
        if ours.get("memory_ratio"):
            line += (f"; peak memory {ours['peak_mib']:.0f} MiB vs {stock['peak_mib']:.0f} MiB "
                     f"({ours['memory_ratio']:.2f}x less)")
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .loops import standalone_main

    return standalone_main(argv, "alignkern.bench.trl_step", __doc__,
                           "a small model, one timed step each", "trl", run_trl_benchmark)


if __name__ == "__main__":
    sys.exit(main())
