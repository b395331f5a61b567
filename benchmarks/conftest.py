"""pytest-benchmark microbenchmarks (``benchmarks/test_*.py``); see docs/benchmarks.md.

Run from the repository root, pinned to one core::

    OMP_NUM_THREADS=1 taskset -c 1 pytest benchmarks --benchmark-only \\
        --benchmark-autosave --benchmark-storage=benchmarks/results/pytest-benchmark

Every benchmark records the machine's 1-minute load average before and after it
(``extra_info``), and the machine info records the load at the start, so a number measured on
a busy machine says so in its JSON.
"""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "benchmarks")):
    if path not in sys.path:
        sys.path.insert(0, path)

# One thread unless asked otherwise: the numbers compare providers, not the machine's cores.
torch.set_num_threads(int(os.environ.get("GDNSQ_BENCH_THREADS", "1")))


def pytest_benchmark_update_machine_info(config, machine_info):
    load = os.getloadavg()
    machine_info["loadavg_at_start"] = list(load)
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["torch"] = torch.__version__
    if load[0] > 0.5 * (os.cpu_count() or 1):
        machine_info["note"] = ("the machine was loaded when this run started (see loadavg_at_start): "
                                "compare providers within the run, not absolute times across runs")


@pytest.fixture(autouse=True)
def _record_load(benchmark):
    benchmark.extra_info["loadavg_1min_before"] = os.getloadavg()[0]
    yield
    benchmark.extra_info["loadavg_1min_after"] = os.getloadavg()[0]
