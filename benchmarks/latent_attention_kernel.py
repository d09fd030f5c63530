"""Latent-attention Triton kernels on CUDA: time, effective bandwidth and roofline fraction.

One attention layer shaped like Llama-3-8B's (32 query heads, 8 KV heads, head
dim 128, bfloat16), its K and V cached as Palu latents (arXiv 2407.21118):
groups of ``gs`` KV heads (1 or 4) share a latent of rank
``kv_ratio * gs * 128`` for K and the same for V (kv_ratio 0.5 or 0.25), so
the latent cache is ``kv_ratio`` of the dense one.

**Decode** (one query token per sequence, batch 1-32, 1k-128k cached keys):

* *kernel*: ``lowrank::latent_attention`` on CUDA, i.e. the fused Triton
  kernels (FlashDecoding-style split over the keys, then a merge);
* *dense*: ``F.scaled_dot_product_attention`` (``enable_gqa``) over full K/V
  of the same layer: what the latent cache replaces;
* *reference*: the unfused reconstruction (``K = Z U^T``, RoPE, repeat for
  GQA, SDPA on the value latent) = ``latent_attention_reference``.

Each call is replayed from a CUDA graph (as a serving loop would, so launch
overhead does not count) over enough copies of its inputs that they do not fit
in L2 (each call reads its operands from HBM, as layer after layer does);
time = median over replays / copies.

*Bytes* are the compulsory HBM traffic (inputs read once, output written once;
latents, up-projections, positions, query, output for the kernel; K, V, query,
output for dense). *FLOPs*: reconstruction ``2 B S Hk D r`` (each KV head's
keys once), scores ``2 B Hq T S D``, values ``2 B Hq T S r`` (dense:
``4 B Hq T S D``; the full T x S square, as PyTorch's FLOP counter counts
it). Effective
bandwidth = bytes / time, against the measured bandwidth of a large device
copy (bytes read + written / time). The roofline bound is
``max(bytes / copy bandwidth, FLOPs / measured bf16 matmul throughput)``; the
tables give each method's fraction of its own bound (1 = at the roofline).

**Prefill** (causal, T = S = 1k-16k, batch 1 and 4): kernel vs reference vs
dense SDPA time.

Needs CUDA (no numbers are produced otherwise)::

    python -m benchmarks.latent_attention_kernel            # full grid
    python -m benchmarks.latent_attention_kernel --quick    # 2 lengths, 2 batches, kv_ratio 0.5

Writes ``docs/results/latent_attention_kernel.{json,md,png}``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import (
    fmt,
    pyplot,
    save_figure,
    table,
    write_json,
    write_markdown,
)
from benchmarks.cuda_timing import graph_time_us, payload_header, roofline_fields, start_benchmark

HEAD_DIM, Q_HEADS, KV_HEADS = 128, 32, 8
DTYPE = torch.bfloat16
ITEM = 2  # bytes per bfloat16
NAME = "latent_attention_kernel"


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmark point: ``batch`` sequences, ``queries`` new tokens each, ``keys`` cached tokens."""

    batch: int
    keys: int
    kv_ratio: float
    group_size: int
    queries: int = 1

    @property
    def groups(self) -> int:
        return KV_HEADS // self.group_size

    @property
    def rank(self) -> int:
        """Latent rank per group, the same for K and V."""
        return round(self.kv_ratio * self.group_size * HEAD_DIM)


def decode_shapes(quick: bool) -> list[Shape]:
    keys = (1024, 8192) if quick else (1024, 4096, 16384, 65536, 131072)
    batches = (1, 8) if quick else (1, 4, 16, 32)
    ratios = (0.5,) if quick else (0.5, 0.25)
    return [Shape(b, s, r, gs) for r in ratios for gs in (1, 4) for b in batches for s in keys]


def prefill_shapes(quick: bool) -> list[Shape]:
    lengths = (1024,) if quick else (1024, 4096, 16384)
    batches = (1,) if quick else (1, 4)
    ratios = (0.5,) if quick else (0.5, 0.25)
    return [Shape(b, t, r, gs, queries=t) for r in ratios for gs in (1, 4) for b in batches for t in lengths]


def latent_bytes(shape: Shape) -> int:
    """Compulsory HBM bytes of the fused kernel: latents, up-projections, positions (int64, shared by the batch)
    and the query read once, the value-latent output written once."""
    b, s, t, r = shape.batch, shape.keys, shape.queries, shape.rank
    latents = b * s * shape.groups * 2 * r * ITEM
    up = KV_HEADS * HEAD_DIM * r * ITEM
    return latents + up + s * 8 + b * t * Q_HEADS * (HEAD_DIM + r) * ITEM


def dense_bytes(shape: Shape) -> int:
    """Compulsory HBM bytes of dense attention: K and V, the query and the output."""
    b, s, t = shape.batch, shape.keys, shape.queries
    return 2 * b * s * KV_HEADS * HEAD_DIM * ITEM + 2 * b * t * Q_HEADS * HEAD_DIM * ITEM


def latent_flops(shape: Shape) -> int:
    """Reconstruction of every KV head's keys once, plus scores and latent values for every query head."""
    b, s, t, r = shape.batch, shape.keys, shape.queries, shape.rank
    return 2 * b * s * KV_HEADS * HEAD_DIM * r + 2 * b * Q_HEADS * t * s * (HEAD_DIM + r)


def dense_flops(shape: Shape) -> int:
    b, s, t = shape.batch, shape.keys, shape.queries
    return 4 * b * Q_HEADS * t * s * HEAD_DIM


def latent_inputs(shape: Shape, device: str = "cuda", seed: int = 0) -> tuple:
    """Arguments of ``lowrank::latent_attention`` (no mask: every cached key is visible; causal for prefill)."""
    g = torch.Generator(device=device).manual_seed(seed)
    b, s, t, r = shape.batch, shape.keys, shape.queries, shape.rank

    def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=g, device=device) * scale).to(DTYPE)

    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2, device=device, dtype=torch.float32) / HEAD_DIM))
    positions = torch.arange(s, device=device)[None]
    return (randn(b, Q_HEADS, t, HEAD_DIM), randn(b, s, shape.groups * r), randn(b, s, shape.groups * r), positions,
            randn(shape.groups, shape.group_size * HEAD_DIM, r, scale=r**-0.5), None, inv_freq, 1.0, None,
            HEAD_DIM**-0.5, t > 1)


def dense_inputs(shape: Shape, device: str = "cuda", seed: int = 0) -> tuple:
    g = torch.Generator(device=device).manual_seed(seed)
    b, s, t = shape.batch, shape.keys, shape.queries
    q, k, v = (torch.randn(b, h, n, HEAD_DIM, generator=g, device=device).to(DTYPE)
               for h, n in ((Q_HEADS, t), (KV_HEADS, s), (KV_HEADS, s)))
    return q, k, v, t > 1


def run_latent_kernel(args: tuple) -> torch.Tensor:
    return torch.ops.lowrank.latent_attention(*args)


def run_reference(args: tuple) -> torch.Tensor:
    from lrcompile.kernels.latent_attention import latent_attention_reference

    return latent_attention_reference(*args)


def run_dense(args: tuple) -> torch.Tensor:
    q, k, v, causal = args
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


def _best_config(kernel: Any) -> str | None:
    config = getattr(kernel, "best_config", None)
    return None if config is None else str(config)


def summarize(shape: Shape, times_us: dict[str, float | None], bandwidth: float, throughput: float) -> dict[str, Any]:
    """One result row: the shape, its bytes and FLOPs, each method's time (None = out of memory), and for the
    kernel and dense attention their effective bandwidth, roofline bound and fraction of it."""
    row: dict[str, Any] = {**dataclasses.asdict(shape), "rank": shape.rank, "latent_bytes": latent_bytes(shape),
                           "dense_bytes": dense_bytes(shape), "latent_flops": latent_flops(shape),
                           "dense_flops": dense_flops(shape)}
    row.update({f"{method}_us": us for method, us in times_us.items()})
    for name, kind in (("kernel", "latent"), ("dense", "dense")):
        row.update(roofline_fields(name, row[f"{name}_us"], row[f"{kind}_bytes"], row[f"{kind}_flops"], bandwidth,
                                   throughput))
    return row


def measure(shape: Shape, bandwidth: float, throughput: float, l2_bytes: int) -> dict[str, Any]:
    from lrcompile.kernels import latent_attention_triton as kt

    latent, dense = latent_bytes(shape), dense_bytes(shape)
    times = {
        "kernel": graph_time_us(run_latent_kernel, lambda seed: latent_inputs(shape, seed=seed), latent, l2_bytes),
        "reference": graph_time_us(run_reference, lambda seed: latent_inputs(shape, seed=seed), latent, l2_bytes),
        "dense": graph_time_us(run_dense, lambda seed: dense_inputs(shape, seed=seed), dense, l2_bytes),
    }
    row = summarize(shape, times, bandwidth, throughput)
    kernel = kt._latent_decode_split_kernel if shape.queries == 1 else kt._latent_prefill_kernel
    row["kernel_config"] = _best_config(kernel)
    return row


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}"


def _us(x: float | None) -> str:
    return "OOM" if x is None else f"{x:.1f}"


def decode_table(rows: Sequence[dict[str, Any]], bandwidth: float) -> str:
    head = ["kv_ratio", "gs", "rank", "batch", "keys", "kernel us", "dense us", "reference us", "dense / kernel",
            "reference / kernel", "kernel GB/s", "of copy bw", "kernel of roofline", "dense of roofline"]
    body = [[r["kv_ratio"], r["group_size"], r["rank"], r["batch"], r["keys"], _us(r["kernel_us"]), _us(r["dense_us"]),
             _us(r["reference_us"]), _ratio(r["dense_us"], r["kernel_us"]), _ratio(r["reference_us"], r["kernel_us"]),
             fmt(r["kernel_GBps"], 0), fmt(None if r["kernel_GBps"] is None else r["kernel_GBps"] * 1e9 / bandwidth, 2),
             fmt(r["kernel_roofline_fraction"], 2), fmt(r["dense_roofline_fraction"], 2)] for r in rows]
    return table(head, body)


def prefill_table(rows: Sequence[dict[str, Any]]) -> str:
    head = ["kv_ratio", "gs", "rank", "batch", "tokens", "kernel ms", "reference ms", "dense ms", "reference / kernel",
            "dense / kernel"]
    body = [[r["kv_ratio"], r["group_size"], r["rank"], r["batch"], r["keys"],
             "OOM" if r["kernel_us"] is None else f"{r['kernel_us'] / 1e3:.2f}",
             "OOM" if r["reference_us"] is None else f"{r['reference_us'] / 1e3:.2f}",
             "OOM" if r["dense_us"] is None else f"{r['dense_us'] / 1e3:.2f}",
             _ratio(r["reference_us"], r["kernel_us"]), _ratio(r["dense_us"], r["kernel_us"])] for r in rows]
    return table(head, body)


def _line(ax: Any, points: Sequence[tuple[float, float | None]], *style: str, **kwargs: Any) -> None:
    """Plot the measured points (None = out of memory) if there are any."""
    points = [(x, y) for x, y in points if y is not None]
    if points:
        ax.plot(*zip(*points), *style, **kwargs)


def plot(payload: dict[str, Any], path: Path) -> bool:
    """Decode time vs cached keys at the smallest and largest batch, and the kernel's roofline fraction."""
    plt = pyplot()
    if plt is None:
        return False
    rows = payload["decode"]
    batches = sorted({r["batch"] for r in rows})
    variants = sorted({(r["kv_ratio"], r["group_size"]) for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, batch in zip(axes, (batches[0], batches[-1])):
        for i, (ratio, gs) in enumerate(variants):
            pts = sorted(((r["keys"], r) for r in rows
                          if (r["batch"], r["kv_ratio"], r["group_size"]) == (batch, ratio, gs)), key=lambda p: p[0])
            color = f"C{i}"
            for method, style in (("kernel", "-"), ("reference", ":")):
                _line(ax, [(k, r[f"{method}_us"]) for k, r in pts], style, color=color, marker="o", ms=3,
                      label=f"{method} kv {ratio} gs {gs}")
        _line(ax, sorted((r["keys"], r["dense_us"]) for r in rows
                         if r["batch"] == batch and (r["kv_ratio"], r["group_size"]) == variants[0]),
              "--", color="black", label="dense SDPA")
        ax.set(xscale="log", yscale="log", xlabel="cached keys", ylabel="us per decode step (one layer)",
               title=f"decode, batch {batch}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[2]
    for i, (ratio, gs) in enumerate(variants):
        for batch, marker in zip((batches[0], batches[-1]), ("o", "s")):
            _line(ax, sorted((r["keys"], r["kernel_roofline_fraction"]) for r in rows
                             if (r["batch"], r["kv_ratio"], r["group_size"]) == (batch, ratio, gs)),
                  color=f"C{i}", marker=marker, ms=3, label=f"kv {ratio} gs {gs} batch {batch}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(xscale="log", xlabel="cached keys", ylabel="roofline time / measured time",
           title="fused kernel: fraction of its roofline")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"latent attention, Llama-3-8B layer shape, bf16, {payload['machine'].get('gpu')}")
    return save_figure(fig, path)


def write_report(payload: dict[str, Any], path: Path, plotted: bool) -> None:
    bw, tput = payload["copy_bandwidth_Bps"], payload["matmul_flops"]
    body = [
        f"GPU: {payload['machine']['gpu']}, triton {payload['machine']['triton']}. Layer: {Q_HEADS} query heads, "
        f"{KV_HEADS} KV heads, head dim {HEAD_DIM}, bfloat16. Measured copy bandwidth {bw / 1e9:.0f} GB/s, "
        f"bf16 matmul {tput / 1e12:.0f} TFLOP/s. Times are medians of CUDA-graph replays over L2-overflowing input "
        "copies (see the benchmark's docstring for bytes, FLOPs and the roofline).",
        "",
        "## Decode (one query token per sequence)",
        "",
        decode_table(payload["decode"], bw),
        "",
        "## Prefill (causal, T = S)",
        "",
        prefill_table(payload["prefill"]),
        "",
    ]
    if plotted:
        body.append(f"![{NAME}]({NAME}.png)")
    write_markdown(path, "Latent attention kernels: decode and prefill on CUDA", payload, body)


def main(argv: Sequence[str] | None = None) -> int:
    started = start_benchmark(NAME, __doc__.split("\n\n")[0],
                              "2 lengths, 2 batches, kv_ratio 0.5, one prefill length", argv)
    if started is None:
        return 0
    out, quick, ceilings = started
    import lrcompile.kernels.latent_attention  # noqa: F401  (registers the op and its CUDA kernels)

    start = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {"decode": [], "prefill": []}
    for phase, shapes in (("decode", decode_shapes(quick)), ("prefill", prefill_shapes(quick))):
        for shape in shapes:
            row = measure(shape, ceilings.bandwidth, ceilings.throughput, ceilings.l2_bytes)
            results[phase].append(row)
            print(f"{phase} {shape}: kernel {_us(row['kernel_us'])} us, dense {_us(row['dense_us'])} us, "
                  f"reference {_us(row['reference_us'])} us", flush=True)
    payload = {**payload_header(NAME, argv, ceilings), **results, "total_wall_s": time.perf_counter() - start}
    write_json(out / f"{NAME}.json", payload)
    plotted = plot(payload, out / f"{NAME}.png")
    write_report(payload, out / f"{NAME}.md", plotted)
    print((out / f"{NAME}.md").read_text().split("<!-- analysis -->")[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
