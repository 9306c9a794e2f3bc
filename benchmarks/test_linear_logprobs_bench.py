"""pytest-benchmark suite for linear_logprobs: the same cases and providers as `alignkern bench`.

    pytest benchmarks/test_linear_logprobs_bench.py --benchmark-group-by=param:case
"""

import pytest
import torch

from alignkern.bench import linear_logprobs as cases_module

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = cases_module.cases(DEVICE, quick=not torch.cuda.is_available())
PROVIDERS = cases_module.providers(DEVICE)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
@pytest.mark.parametrize(("mode", "provider"), cases_module.runs(PROVIDERS))
def test_linear_logprobs(benchmark, case, mode, provider):
    fn = PROVIDERS[provider]
    if isinstance(fn, str):
        pytest.skip(fn)
    inputs = case.make_inputs(DEVICE)
    make = cases_module.forward_fn if mode == "fwd" else cases_module.forward_backward_fn
    step = make(fn, *inputs)

    def run():
        step()
        _sync()

    benchmark.extra_info.update(flops=case.flops(mode), device=str(DEVICE))
    benchmark(run)
