"""Prefill and decode throughput: ``lowrank`` + Inductor against dense Inductor, same process, same inputs.

Two fresh copies of the trained ``small`` Llama fixture (float32, CPU) are compiled
with ``dynamic=False``:

* **dense**: ``torch.compile(model, backend="inductor")``;
* **compressed**: ``torch.compile(model, backend="lowrank", options=LowRankConfig(
  param_ratio=0.8, method="whiten", allocation="closed_form", compiler="inductor", ...))``.
  Its first call is a prefill of a calibration batch (8 x 128 train tokens; 4
  such batches calibrate it). Every later graph (batch 1, decode) reuses the
  recorded factors without calibrating.

What is timed (``time.perf_counter`` around the call, under ``torch.no_grad``):

* **prefill**: one forward of ``input_ids [B, S]`` (S = 128 held-out tokens) with a
  fresh empty ``transformers.DynamicCache`` as ``past_key_values``,
  ``use_cache=True`` and ``logits_to_keep=1``, as ``generate`` runs its prefill:
  all layers over S tokens, the K/V written into the cache, logits of the last
  position only. Throughput = B * S / time.
* **decode**: one forward of one new token per sequence, ``input_ids [B, 1]``, against
  a ``DynamicCache`` holding the K/V of the S-token prefill made by the same
  compiled model (the cache is cloned from that prefill before each call, outside
  the timer, so every timed call sees the same cache length S and no call
  recompiles; ``torch._dynamo.config.error_on_recompile`` is on while timing).
  The timed call includes HF's ``DynamicCache.update`` (a ``torch.cat`` that copies
  the cache, as HF's dynamic cache does in real generation), attention over S+1
  positions and the logits. One sample = the mean of ``--decode-inner`` such
  calls. Throughput = B / time (new tokens per second).

Samples of the dense-Inductor, compressed and eager-dense models are interleaved
(the order rotates every repeat) so machine noise hits all alike; the tables give
medians and ratios of medians (compressed / dense Inductor, > 1 = compressed is
faster). A micro-benchmark times each factored layer shape alone (``F.linear``
dense vs two thin ``F.linear``, eager) at 1 ... 1024 tokens, to show where
factoring pays on this CPU. CPU only: no CUDA here.

Run from the repository root::

    python -m benchmarks.speed            # ~5 min (8 Inductor compiles)
    python -m benchmarks.speed --quick    # tiny fixture, batch 1 only

Writes ``docs/results/speed.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import torch
import torch.nn.functional as F

from benchmarks.common import (
    CompileRecorder,
    command_line,
    fmt,
    machine_info,
    median,
    pyplot,
    resolve_out,
    save_figure,
    set_threads,
    table,
    write_json,
    write_markdown,
)

KINDS = ("dense", "lowrank", "eager")
LABEL = {"dense": "dense Inductor", "lowrank": "lowrank + Inductor", "eager": "dense eager"}


def _kv(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def _kv_bytes(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    return sum(k.untyped_storage().nbytes() + v.untyped_storage().nbytes() for k, v in kv)


class Runner:
    """One model (compiled or eager) with its prefill and decode calls."""

    def __init__(self, kind: str, fn: Any):
        self.kind, self.fn = kind, fn
        self.kv: dict[int, list] = {}
        self.first_call_s: dict[str, float] = {}

    def prefill(self, ids: torch.Tensor) -> Any:
        from transformers import DynamicCache

        cache = DynamicCache()
        start = time.perf_counter()
        out = self.fn(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - start, out, cache

    def decode(self, token: torch.Tensor, inner: int) -> tuple[float, Any]:
        from transformers import DynamicCache

        caches = [DynamicCache(self.kv[token.shape[0]]) for _ in range(inner)]  # outside the timer
        start = time.perf_counter()
        for cache in caches:
            out = self.fn(input_ids=token, past_key_values=cache, use_cache=True)
        return (time.perf_counter() - start) / inner, out


def linear_microbench(shapes: list[tuple[int, int, int]], tokens: list[int], repeats: int) -> list[dict[str, Any]]:
    """Eager time of ``F.linear(x, W)`` vs ``F.linear(F.linear(x, B), A)`` per (out, in, rank) and token count."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    for m, n, k in shapes:
        w = torch.randn(m, n, generator=gen)
        down, up = torch.randn(k, n, generator=gen), torch.randn(m, k, generator=gen)
        for t in tokens:
            x = torch.randn(t, n, generator=gen)
            times = {"dense": [], "factored": []}
            inner = max(1, int(2e6 // max(1, t * m * n // 64)))  # ~ms-scale samples
            for _ in range(3):
                F.linear(x, w), F.linear(F.linear(x, down), up)
            for _ in range(repeats):
                for name, fn in (("dense", lambda: F.linear(x, w)), ("factored", lambda: F.linear(F.linear(x, down), up))):
                    start = time.perf_counter()
                    for _ in range(inner):
                        fn()
                    times[name].append((time.perf_counter() - start) / inner)
            d, f = median(times["dense"]), median(times["factored"])
            rows.append({"out": m, "in": n, "rank": k, "tokens": t, "dense_us": d * 1e6, "factored_us": f * 1e6,
                         "speedup": d / f, "flop_ratio": (m * n) / (k * (m + n))})
    return rows


def _graph_info(recorder: CompileRecorder, first: int) -> dict[str, Any]:
    """Backend times of the graphs compiled since ``first``, and whether they calibrated or reused recorded factors."""
    new = recorder.graphs[first:]
    comps = [g["compression"] for g in new if g["compression"] is not None]
    return {**recorder.totals(first), "graphs": len(new),
            "calibrated": any(c.runner is not None for c in comps),
            "reused_layers": sum(len(c.recorded) for c in comps)}


def _quartiles(values: list[float]) -> list[float]:
    ordered = sorted(values)
    return [ordered[int(q * (len(ordered) - 1))] for q in (0.25, 0.5, 0.75)]


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import lrcompile
    from benchmarks.fixtures import calibration_chunks, heldout_chunks, load_fixture

    t_total = time.perf_counter()
    torch._dynamo.config.recompile_limit = 64  # 4 graphs per model share LlamaForCausalLM.forward
    torch._dynamo.config.cache_size_limit = 64
    fixture = load_fixture(args.fixture)
    S, batches = args.seq_len, sorted(args.batches)
    cal_batch = max(batches)
    calibration = calibration_chunks(fixture, S, args.calib_batches, cal_batch)
    windows = {b: heldout_chunks(fixture, S + 1, 1, b)[0] for b in batches}  # prefill S tokens, decode token S+1

    torch._dynamo.reset()
    recorder = CompileRecorder()
    dense_model, comp_model, eager_model = fixture.load_model(), fixture.load_model(), fixture.load_model()
    config = lrcompile.LowRankConfig(
        calibration=calibration, param_ratio=args.param_ratio, method=args.method, allocation=args.allocation,
        compiler="inductor",
    )
    runners = {
        "dense": Runner("dense", torch.compile(dense_model, backend=recorder.dense_backend(), dynamic=False)),
        "lowrank": Runner("lowrank", torch.compile(comp_model, backend="lowrank", options=config, dynamic=False)),
        "eager": Runner("eager", eager_model),
    }
    graphs: list[dict[str, Any]] = []
    checks: dict[str, Any] = {}
    with recorder.active(), torch.no_grad():
        # The compressed model's first compiled call: a prefill of a calibration batch (it calibrates).
        first = len(recorder.graphs)
        t, _, _ = runners["lowrank"].prefill(calibration[0])
        graphs.append({"model": "lowrank", "graph": f"prefill B={cal_batch} (calibration)", "first_call_s": t,
                       **_graph_info(recorder, first)})
        # Compile every other graph once (and keep each model's own prefill cache for decode).
        for b in batches:
            ids, token = windows[b][:, :S], windows[b][:, S:]
            for kind in KINDS:
                r = runners[kind]
                first = len(recorder.graphs)
                t, out_p, cache = r.prefill(ids)
                if kind != "eager" and not (kind == "lowrank" and b == cal_batch):
                    graphs.append({"model": kind, "graph": f"prefill B={b}", "first_call_s": t, **_graph_info(recorder, first)})
                r.kv[b] = _kv(cache)
                first = len(recorder.graphs)
                t, out_d = r.decode(token, 1)
                if kind != "eager":
                    graphs.append({"model": kind, "graph": f"decode B={b} (cache {S})", "first_call_s": t,
                                   **_graph_info(recorder, first)})
                checks.setdefault(b, {})[kind] = {"prefill_last": out_p.logits[:, -1].clone(), "decode": out_d.logits[:, -1].clone()}
        # Sanity: the compiled dense model matches eager; the compressed one's next-token choice vs dense.
        sanity = {}
        for b, c in checks.items():
            sanity[b] = {
                "dense_inductor_vs_eager_max_abs_diff": max(
                    float((c["dense"][k] - c["eager"][k]).abs().max()) for k in ("prefill_last", "decode")),
                "lowrank_vs_dense_top1_agreement_decode": float(
                    (c["lowrank"]["decode"].argmax(-1) == c["dense"]["decode"].argmax(-1)).float().mean()),
                "lowrank_vs_dense_top1_agreement_prefill": float(
                    (c["lowrank"]["prefill_last"].argmax(-1) == c["dense"]["prefill_last"].argmax(-1)).float().mean()),
            }
        kv_bytes = {b: {k: _kv_bytes(runners[k].kv[b]) for k in KINDS} for b in batches}
        compiled_graphs = len(recorder.graphs)

        # Timing: interleaved, rotating order, no recompiles allowed.
        samples: dict[tuple[str, str, int], list[float]] = {}
        torch._dynamo.config.error_on_recompile = True
        try:
            for b in batches:
                ids, token = windows[b][:, :S], windows[b][:, S:]
                for rep in range(args.warmup + args.repeats):
                    order = KINDS[rep % 3:] + KINDS[: rep % 3]
                    for kind in order:
                        tp, _, _ = runners[kind].prefill(ids)
                        td, _ = runners[kind].decode(token, args.decode_inner)
                        if rep >= args.warmup:
                            samples.setdefault(("prefill", kind, b), []).append(tp)
                            samples.setdefault(("decode", kind, b), []).append(td)
        finally:
            torch._dynamo.config.error_on_recompile = False
        assert len(recorder.graphs) == compiled_graphs, "a timed call compiled a new graph"

    report = lrcompile.model_report(comp_model)
    totals = report.totals()
    factored_shapes = sorted({(l.out_features, l.in_features, l.rank) for l in report.layers if l.status == "factored"})
    rows = []
    for phase in ("prefill", "decode"):
        for b in batches:
            med = {k: median(samples[(phase, k, b)]) for k in KINDS}
            tokens = b * S if phase == "prefill" else b
            rows.append({
                "phase": phase, "batch": b, "tokens_per_call": tokens,
                **{f"{k}_ms": med[k] * 1e3 for k in KINDS},
                **{f"{k}_tok_s": tokens / med[k] for k in KINDS},
                "ratio_vs_dense_inductor": med["dense"] / med["lowrank"],
                # per-repeat ratios (the dense and lowrank samples of one repeat are adjacent in time): their spread
                "paired_ratio_quartiles": _quartiles([d / l for d, l in zip(samples[(phase, "dense", b)],
                                                                           samples[(phase, "lowrank", b)])]),
                "inductor_vs_eager": med["eager"] / med["dense"],
                "samples": {k: samples[(phase, k, b)] for k in KINDS},
            })
    micro = linear_microbench(factored_shapes, args.micro_tokens, args.micro_repeats) if args.micro_tokens else []
    linear_flops_ratio = totals["params_after"] / max(1, totals["params_before"])
    payload = {
        "machine": machine_info(),
        "command": command_line("benchmarks.speed", args.argv),
        "settings": {
            "fixture": args.fixture, "num_params": fixture.num_params, "seq_len": S, "batches": batches,
            "cache_len": S, "calibration": f"{args.calib_batches} x [{cal_batch}, {S}] train tokens",
            "param_ratio": args.param_ratio, "method": args.method, "allocation": args.allocation,
            "dynamic": False, "repeats": args.repeats, "warmup": args.warmup, "decode_inner": args.decode_inner,
            "dtype": "float32", "device": "cpu",
        },
        "compression": {
            **totals, "model_weight_bytes_dense": lrcompile.weight_bytes(dense_model),
            "model_weight_bytes_compressed": lrcompile.weight_bytes(comp_model),
            "factored_shapes": factored_shapes, "linear_flops_ratio": linear_flops_ratio,
        },
        "graphs": graphs,
        "sanity": sanity,
        "kv_cache_bytes": kv_bytes,
        "results": rows,
        "linear_microbench": micro,
        "total_wall_s": time.perf_counter() - t_total,
    }
    return payload


def plot_speed(payload: dict[str, Any], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    rows = payload["results"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, phase in zip(axes, ("prefill", "decode")):
        pts = sorted((r["batch"], r) for r in rows if r["phase"] == phase)
        xs = [b for b, _ in pts]
        ax.plot(xs, [r["ratio_vs_dense_inductor"] for _, r in pts], marker="o", label="lowrank+Inductor / dense Inductor")
        ax.plot(xs, [1 / r["inductor_vs_eager"] for _, r in pts], marker="s", ls="--", label="dense eager / dense Inductor")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("batch size")
        ax.set_ylabel("throughput ratio (> 1: faster than dense Inductor)")
        ax.set_title(f"{phase} ({'S' if phase == 'prefill' else 'cache'} = {payload['settings']['seq_len']} tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    s = payload["settings"]
    fig.suptitle(f"{s['fixture']} Llama, {s['method']}/{s['allocation']} @ {s['param_ratio']}, CPU "
                 f"({payload['machine']['torch_threads']} thread), medians")
    return save_figure(fig, path)


def write_speed_markdown(payload: dict[str, Any], path: Path, plot: bool) -> None:
    s, c = payload["settings"], payload["compression"]
    rows = []
    for r in payload["results"]:
        rows.append([r["phase"], r["batch"], f"{r['dense_tok_s']:,.0f}", f"{r['lowrank_tok_s']:,.0f}",
                     f"**{r['ratio_vs_dense_inductor']:.3f}**",
                     "{:.2f} - {:.2f}".format(r["paired_ratio_quartiles"][0], r["paired_ratio_quartiles"][2]),
                     f"{r['eager_tok_s']:,.0f}", fmt(r["inductor_vs_eager"], 2),
                     f"{r['dense_ms']:.3f} / {r['lowrank_ms']:.3f} / {r['eager_ms']:.3f}"])
    main_table = table(
        ["phase", "batch", "dense Inductor tok/s", "lowrank+Inductor tok/s", "ratio (lowrank / dense)",
         "per-repeat ratio p25 - p75", "dense eager tok/s", "Inductor speedup over eager",
         "median ms per call (dense / lowrank / eager)"],
        rows, "lr" + "r" * 7)
    graph_rows = [[g["model"], g["graph"], g.get("graphs", "-"), fmt(g["first_call_s"], 1), fmt(g.get("compress_s"), 1),
                   fmt(g.get("downstream_s"), 1),
                   "-" if g["model"] == "dense" else ("yes" if g.get("calibrated") else f"no (reused {g.get('reused_layers')} recorded layers)")]
                  for g in payload["graphs"]]
    sanity_rows = [[b, f"{v['dense_inductor_vs_eager_max_abs_diff']:.2e}", fmt(v["lowrank_vs_dense_top1_agreement_prefill"], 3),
                    fmt(v["lowrank_vs_dense_top1_agreement_decode"], 3)] for b, v in payload["sanity"].items()]
    micro_rows = [[f"{m['out']} x {m['in']}", m["rank"], m["tokens"], fmt(m["flop_ratio"], 2), f"{m['dense_us']:.1f}",
                   f"{m['factored_us']:.1f}", fmt(m["speedup"], 2)] for m in payload["linear_microbench"]]
    body = [
        f"- model: trained `{s['fixture']}` Llama fixture ({s['num_params']:,} parameters), float32, CPU; "
        f"`torch.compile(..., dynamic=False)`; no CUDA on this machine, so no GPU numbers",
        f"- compressed: `LowRankConfig(param_ratio={s['param_ratio']}, method='{s['method']}', "
        f"allocation='{s['allocation']}', compiler='inductor')`, calibrated on {s['calibration']}; "
        f"{c['factored']}/{c['linears']} linears factored, linear parameters {c['params_before']:,} -> "
        f"{c['params_after']:,} (ratio {c['param_ratio']}), model weight bytes {c['model_weight_bytes_dense']:,} -> "
        f"{c['model_weight_bytes_compressed']:,}",
        f"- prefill: `model(input_ids=[B, {s['seq_len']}], past_key_values=DynamicCache(), use_cache=True, "
        "logits_to_keep=1)` (generate's prefill: K/V written to the cache, last-position logits); "
        "throughput = B x S / median time",
        f"- decode: `model(input_ids=[B, 1], past_key_values=<cache of {s['cache_len']} positions from that model's "
        "own prefill, cloned outside the timer>, use_cache=True)`; includes the DynamicCache update (torch.cat), "
        f"attention over {s['cache_len'] + 1} positions and the logits; one sample = mean of {s['decode_inner']} calls; "
        "throughput = B / median time. No call recompiles (checked with `error_on_recompile`)",
        f"- {s['repeats']} samples per cell after {s['warmup']} warm-up rounds, dense Inductor / lowrank / eager "
        "interleaved in rotating order; medians; ratio = compressed throughput / dense Inductor throughput "
        "(ratio of medians); p25 - p75 = quartiles of the per-repeat ratios, a measure of the noise",
        "",
        "## Throughput",
        "",
        main_table,
        "",
    ]
    if plot:
        body += ["![throughput ratio vs batch](speed.png)", ""]
    body += [
        "## Why: each factored layer alone (eager `F.linear`, same thread count)",
        "",
        "flop ratio = m n / (k (m + n)): the factor by which factoring cuts the layer's multiply-adds (> 1 saves). "
        "speedup = dense time / factored time.",
        "",
        table(["shape (out x in)", "rank", "tokens", "flop ratio", "dense us", "factored us", "speedup"], micro_rows, "lrrrrrr")
        if micro_rows else "_not run_",
        "",
        "## Compiled graphs (first-call wall time, s)",
        "",
        "compress: the lowrank backend's passes; downstream: Inductor's compile of the (rewritten) graph.",
        "",
        table(["model", "graph", "graphs compiled", "first call", "compress", "downstream (Inductor)", "calibrated"],
              graph_rows, "llrrrrl"),
        "",
        "## Sanity",
        "",
        table(["batch", "dense Inductor vs eager: max abs logit diff", "top-1 agreement lowrank vs dense (prefill)",
               "top-1 agreement (decode)"], sanity_rows, "lrrr"),
    ]
    write_markdown(path, "Prefill and decode throughput: lowrank + Inductor vs dense Inductor (CPU)", payload, body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixture", default="small")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--seq-len", type=int, default=128, help="prefill tokens = decode cache length (default 128)")
    parser.add_argument("--param-ratio", type=float, default=0.8)
    parser.add_argument("--method", default="whiten")
    parser.add_argument("--allocation", default="closed_form")
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--decode-inner", type=int, default=10)
    parser.add_argument("--micro-tokens", nargs="*", type=int, default=[1, 8, 128, 1024])
    parser.add_argument("--micro-repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; see benchmarks.run.set_threads)")
    parser.add_argument("--quick", action="store_true", help="tiny fixture, batch 1, fewer repeats")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default docs/results)")
    args = parser.parse_args(argv)
    args.argv = argv
    if args.quick:
        args.fixture, args.batches, args.repeats, args.micro_tokens = "tiny", [1], 7, [1, 128]
    out = resolve_out(args.out, args.quick)
    set_threads(args.threads)
    logging.getLogger("lrcompile").setLevel(logging.WARNING)
    payload = run(args, out)
    write_json(out / "speed.json", payload)
    plot = plot_speed(payload, out / "speed.png")
    write_speed_markdown(payload, out / "speed.md", plot)
    print((out / "speed.md").read_text().split("## Why")[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
