"""The CUDA kernel benchmarks' shared timing module (benchmarks/cuda_timing.py), on a machine without CUDA."""

from __future__ import annotations

import importlib

import pytest
import torch

from benchmarks.cuda_timing import roofline_s


def test_roofline_is_the_slower_of_memory_and_arithmetic():
    assert roofline_s(10, 1, bandwidth=5, throughput=1) == 2  # memory-bound
    assert roofline_s(10, 8, bandwidth=5, throughput=1) == 8  # compute-bound


@pytest.mark.parametrize("name", ["aq_linear_kernel", "latent_attention_kernel"])
def test_benchmark_without_cuda_says_so_and_writes_nothing(name, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the benchmark would run")
    bench = importlib.import_module(f"benchmarks.{name}")
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    assert "CUDA is required" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
