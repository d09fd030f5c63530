"""AQ linear Triton kernels on CUDA: ``lowrank::aq_linear`` against a dense bfloat16 ``F.linear``.

Llama-2-7B's linear shapes (4096 x 4096 attention projections, 4096 -> 11008
gate/up, 11008 -> 4096 down), bfloat16 activations, AQLM codes at g = 8
(arXiv 2401.06118): 2x8 (uint8 codes) and 1x16 (int16 codes), codebooks in
bfloat16, one scale per output row.

* *decode* (1, 4 and 16 rows): the fused gather + matrix-vector kernel (the
  dense weight never exists); its compulsory bytes are the codes
  (``M*B/g`` bits a weight), the codebooks, the scales, ``x`` and ``y``.
  Dense: the bf16 weight (16 bits a weight) and the same ``x``, ``y``.
* *prefill* (2048 rows): a dequantisation kernel writes the bf16 weight, then
  cuBLAS; against the dense matmul alone.

Each call is replayed from a CUDA graph over enough copies of its operands
that they overflow L2 (``benchmarks.cuda_timing``); time = median over replays
/ copies. The roofline bound is ``max(bytes / copy bandwidth, FLOPs / bf16
matmul throughput)``, both measured at the start.

Needs CUDA (no numbers are produced otherwise)::

    python -m benchmarks.aq_linear_kernel            # 2x8 and 1x16, every shape
    python -m benchmarks.aq_linear_kernel --quick    # 2x8, decode rows 1 and 16

Writes ``docs/results/aq_linear_kernel.{json,md}``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import fmt, table, write_json, write_markdown
from benchmarks.cuda_timing import graph_time_us, payload_header, roofline_fields, start_benchmark

NAME = "aq_linear_kernel"
DTYPE = torch.bfloat16
ITEM = 2  # bytes per bfloat16
GROUP = 8
LAYERS = {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)}  # (out, in)
CONFIGS = {"2x8": (2, 8), "1x16": (1, 16)}  # codebooks x bits


@dataclasses.dataclass(frozen=True)
class Point:
    """One benchmark point: a layer of ``out x in`` weights, ``config`` codes, ``rows`` input rows."""

    layer: str
    config: str
    rows: int

    @property
    def out_features(self) -> int:
        return LAYERS[self.layer][0]

    @property
    def in_features(self) -> int:
        return LAYERS[self.layer][1]

    @property
    def books(self) -> int:
        return CONFIGS[self.config][0]

    @property
    def bits(self) -> int:
        return CONFIGS[self.config][1]


def points(quick: bool) -> list[Point]:
    configs = ("2x8",) if quick else tuple(CONFIGS)
    rows = (1, 16) if quick else (1, 4, 16, 2048)
    return [Point(layer, config, r) for config in configs for layer in LAYERS for r in rows]


def aq_bytes(p: Point) -> int:
    """Compulsory bytes of the AQ op: codes, codebooks, scales, ``x`` read once, ``y`` written once."""
    codes = p.out_features * (p.in_features // GROUP) * p.books * p.bits // 8
    codebooks = p.books * 2**p.bits * GROUP * ITEM
    return codes + codebooks + p.out_features * ITEM + p.rows * (p.in_features + p.out_features) * ITEM


def dense_bytes(p: Point) -> int:
    return (p.out_features * p.in_features + p.rows * (p.in_features + p.out_features)) * ITEM


def flops(p: Point) -> int:
    return 2 * p.rows * p.out_features * p.in_features


def aq_operands(p: Point, seed: int = 0, device: str = "cuda") -> tuple:
    """``x, codes, codebooks, scales, bias`` with random codes (the kernels' time does not depend on them)."""
    g = torch.Generator(device=device).manual_seed(seed)
    groups = p.in_features // GROUP
    codes = torch.randint(0, 2**p.bits, (p.out_features, groups, p.books), generator=g, device=device)
    codes = codes.to(torch.uint8 if p.bits <= 8 else torch.int16)
    codebooks = torch.randn(p.books, 2**p.bits, GROUP, generator=g, device=device).to(DTYPE)
    scales = (torch.rand(p.out_features, generator=g, device=device) * 0.02).to(DTYPE)
    x = torch.randn(p.rows, p.in_features, generator=g, device=device).to(DTYPE)
    return x, codes, codebooks, scales, None


def dense_operands(p: Point, seed: int = 0, device: str = "cuda") -> tuple:
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(p.rows, p.in_features, generator=g, device=device).to(DTYPE)
    weight = (torch.randn(p.out_features, p.in_features, generator=g, device=device) * 0.02).to(DTYPE)
    return x, weight


def run_aq(args: tuple) -> torch.Tensor:
    return torch.ops.lowrank.aq_linear(*args)


def run_dense(args: tuple) -> torch.Tensor:
    return F.linear(*args)


def summarize(p: Point, aq_us: float | None, dense_us: float | None, bandwidth: float, throughput: float,
              matvec_config: str | None = None) -> dict[str, Any]:
    """One result row: the point, its bytes and FLOPs, both times (None = out of memory), for both the
    effective bandwidth and the fraction of the roofline bound reached, and the tuned matvec tiles."""
    row: dict[str, Any] = {**dataclasses.asdict(p), "out_features": p.out_features, "in_features": p.in_features,
                           "aq_bytes": aq_bytes(p), "dense_bytes": dense_bytes(p), "flops": flops(p),
                           "aq_us": aq_us, "dense_us": dense_us}
    for name in ("aq", "dense"):
        row.update(roofline_fields(name, row[f"{name}_us"], row[f"{name}_bytes"], row["flops"], bandwidth, throughput))
    row["dense_over_aq"] = None if aq_us is None or dense_us is None else dense_us / aq_us
    row["matvec_config"] = matvec_config
    return row


def measure(p: Point, bandwidth: float, throughput: float, l2_bytes: int) -> dict[str, Any]:
    from lrcompile.kernels import aq_linear_triton as kt

    aq_us = graph_time_us(run_aq, lambda seed: aq_operands(p, seed), aq_bytes(p), l2_bytes)
    dense_us = graph_time_us(run_dense, lambda seed: dense_operands(p, seed), dense_bytes(p), l2_bytes)
    best = getattr(kt._aq_matvec_kernel, "best_config", None)
    fused = p.rows <= kt.MAX_MATVEC_ROWS and best is not None
    return summarize(p, aq_us, dense_us, bandwidth, throughput, str(best) if fused else None)


def report_table(rows: Sequence[dict[str, Any]], bandwidth: float) -> str:
    head = ["config", "layer", "rows", "AQ us", "dense us", "dense / AQ", "AQ GB/s", "AQ of roofline",
            "dense of roofline", "matvec tiles"]
    body = [[r["config"], f"{r['layer']} {r['out_features']}x{r['in_features']}", r["rows"], fmt(r["aq_us"], 1),
             fmt(r["dense_us"], 1), fmt(r["dense_over_aq"], 2), fmt(r["aq_GBps"], 0),
             fmt(r["aq_roofline_fraction"], 2), fmt(r["dense_roofline_fraction"], 2), r["matvec_config"] or "-"]
            for r in rows]
    return table(head, body)


def write_report(payload: dict[str, Any], path: Path) -> None:
    bw, tput = payload["copy_bandwidth_Bps"], payload["matmul_flops"]
    body = [
        f"GPU: {payload['machine']['gpu']}, triton {payload['machine']['triton']}. bfloat16 activations, AQ codes "
        f"at g = {GROUP}, bfloat16 codebooks. Measured copy bandwidth {bw / 1e9:.0f} GB/s, bf16 matmul "
        f"{tput / 1e12:.0f} TFLOP/s. Times are medians of CUDA-graph replays over L2-overflowing operand copies; "
        "rows <= 16 run the fused matrix-vector kernel, more rows dequantise then call cuBLAS (see the benchmark's "
        "docstring for bytes and the roofline).",
        "",
        report_table(payload["rows"], bw),
        "",
    ]
    write_markdown(path, "AQ linear kernels on CUDA: AQLM codes vs dense bf16", payload, body)


def main(argv: Sequence[str] | None = None) -> int:
    started = start_benchmark(NAME, __doc__.split("\n\n")[0], "2x8 only, decode rows 1 and 16", argv)
    if started is None:
        return 0
    out, quick, ceilings = started
    import lrcompile.kernels.aq_linear  # noqa: F401  (registers the op and its CUDA kernels)

    start = time.perf_counter()
    rows = []
    for p in points(quick):
        rows.append(measure(p, ceilings.bandwidth, ceilings.throughput, ceilings.l2_bytes))
        print(f"{p}: AQ {fmt(rows[-1]['aq_us'], 1)} us, dense {fmt(rows[-1]['dense_us'], 1)} us", flush=True)
    payload = {**payload_header(NAME, argv, ceilings), "rows": rows, "total_wall_s": time.perf_counter() - start}
    write_json(out / f"{NAME}.json", payload)
    write_report(payload, out / f"{NAME}.md")
    print((out / f"{NAME}.md").read_text().split("<!-- analysis -->")[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
