"""Timing on CUDA for the kernel benchmarks: CUDA-graph replays over L2-overflowing inputs, and the machine's
two ceilings (copy bandwidth, bf16 matmul throughput) that a roofline compares against."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import command_line, machine_info, median, resolve_out


def roofline_s(nbytes: int, flops: int, bandwidth: float, throughput: float) -> float:
    """Lower bound on the time: memory-bound or compute-bound, whichever is slower."""
    return max(nbytes / bandwidth, flops / throughput)


def roofline_fields(name: str, us: float | None, nbytes: int, flops: int, bandwidth: float,
                    throughput: float) -> dict[str, float | None]:
    """A method's roofline bound (us), effective bandwidth (GB/s) and fraction of the bound reached, as result
    row fields ``{name}_roofline_us``, ``{name}_GBps``, ``{name}_roofline_fraction`` (None when ``us`` is)."""
    bound = roofline_s(nbytes, flops, bandwidth, throughput) * 1e6
    return {f"{name}_roofline_us": bound, f"{name}_GBps": None if us is None else nbytes / us / 1e3,
            f"{name}_roofline_fraction": None if us is None else bound / us}


def graph_time_us(run: Callable[[tuple], Any], make_inputs: Callable[[int], tuple], nbytes: int, l2_bytes: int,
                  replays: int = 10) -> float | None:
    """Median microseconds per call, replayed from a CUDA graph over enough input copies to overflow L2;
    None when the method runs out of memory."""
    copies = min(64, max(1, math.ceil(4 * l2_bytes / max(nbytes, 1))))
    inputs, graph = [], None
    try:
        inputs = [make_inputs(seed) for seed in range(copies)]
        for args in inputs:  # warm-up (autotuning, lazy initialisation) outside the graph
            run(args)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the graph's private pool cannot reuse blocks cached by the warm-up
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for args in inputs:
                run(args)
        samples = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3 / copies)
        return median(samples)
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        inputs = graph = None
        torch.cuda.empty_cache()


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Bytes per second of a large device-to-device copy (read + written)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = event_median_s(lambda: dst.copy_(src))
    return 2 * nbytes / seconds


def matmul_throughput(n: int = 8192) -> float:
    """FLOP per second of a large bfloat16 matmul."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / event_median_s(lambda: a @ b)


def event_median_s(fn: Callable[[], Any], repeats: int = 20) -> float:
    """Median seconds of `fn()` between CUDA events, after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return median(samples)


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """The GPU's measured ceilings, and its L2 size (how much input a timing must overflow)."""

    bandwidth: float  # bytes per second of a large device-to-device copy, read + written
    throughput: float  # FLOP per second of a large bfloat16 matmul
    l2_bytes: int


def start_benchmark(name: str, description: str, quick_help: str,
                    argv: Sequence[str] | None) -> tuple[Path, bool, Ceilings] | None:
    """Parse a kernel benchmark's ``--quick`` and ``--out``, then measure the ceilings: ``(output folder, quick,
    ceilings)``, or None (saying so on stderr) without CUDA."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default docs/results)")
    args = parser.parse_args(argv)
    ceilings = measure_ceilings(name)
    return None if ceilings is None else (resolve_out(args.out, args.quick), args.quick, ceilings)


def measure_ceilings(name: str) -> Ceilings | None:
    """The ceilings, measured now; None (saying so on stderr) without CUDA."""
    if not torch.cuda.is_available():
        print(f"{name}: CUDA is required (the kernels run on a GPU); nothing measured, nothing written.",
              file=sys.stderr)
        return None
    l2_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
    ceilings = Ceilings(copy_bandwidth(), matmul_throughput(), l2_bytes)
    print(f"copy bandwidth {ceilings.bandwidth / 1e9:.0f} GB/s, bf16 matmul {ceilings.throughput / 1e12:.0f} TFLOP/s")
    return ceilings


def payload_header(name: str, argv: Sequence[str] | None, ceilings: Ceilings) -> dict[str, Any]:
    """The JSON payload's machine (with the GPU and Triton), command and ceilings."""
    import triton

    return {
        "machine": {**machine_info(), "gpu": torch.cuda.get_device_name(0), "triton": triton.__version__,
                    "l2_bytes": ceilings.l2_bytes},
        "command": command_line(f"benchmarks.{name}", argv),
        "copy_bandwidth_Bps": ceilings.bandwidth,
        "matmul_flops": ceilings.throughput,
    }
