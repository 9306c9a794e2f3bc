"""pytest-benchmark suites for every op family: the same cases and providers as `alignkern bench`.

    pytest benchmarks/ --benchmark-group-by=param:case
"""

import pytest
import torch

from alignkern.bench import FAMILIES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = not torch.cuda.is_available()


def _params():
    for op, module in FAMILIES.items():
        found = module.providers(DEVICE)
        for case in module.cases(DEVICE, QUICK):
            for mode, provider in module.runs(found):
                yield pytest.param(module, case, mode, provider, found[provider],
                                   id=f"{op}-{case.label}-{mode}-{provider}")


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize(("module", "case", "mode", "name", "provider"), list(_params()))
def test_op(benchmark, module, case, mode, name, provider):
    if isinstance(provider, str):
        pytest.skip(provider)
    inputs = case.make_inputs(DEVICE)
    make = module.forward_fn if mode == "fwd" else module.forward_backward_fn
    step = make(provider, *inputs)
    if not name.startswith("alignkern"):
        try:
            step()
        except (NotImplementedError, RuntimeError) as exc:  # e.g. FlexAttention's CPU backward
            pytest.skip(f"{name} cannot run this case here: {str(exc).splitlines()[0][:100]}")

    def run():
        step()
        _sync()

    benchmark.extra_info.update(case=case.label, bytes_moved=case.bytes_moved(mode),
                                flops=case.flops(mode), device=str(DEVICE))
    benchmark(run)
