"""Memory actually allocated: weights, KV cache and peak RSS, compressed vs dense.

Each configuration runs in its own subprocess, so peaks never mix:

* ``dense``: a fresh fixture model, eager;
* ``dense_compiled``: the same through ``torch.compile(backend="eager")``: Dynamo's
  capture and guards cost memory of their own, so this is the fair reference
  for the RSS of the compiled configurations;
* ``lowrank``: a fresh model compiled with ``backend="lowrank"`` (``whiten`` /
  ``closed_form`` at param ratio 0.8, downstream ``compiler="eager"`` so that
  Inductor's own compile-time memory does not blur the comparison), calibrated in
  the process on 4 batches of 8 x 128 train tokens; it then saves its plan;
* ``lowrank_loaded``: that compressed model saved with ``save_pretrained`` and
  loaded with ``from_pretrained`` (built compressed, no dense weight), compiled
  the same way: no calibration, the path a deployment would take;
* ``lowrank_kv``: like ``lowrank`` plus ``kv_ratio`` (latent KV cache, Palu);
  its prefill writes into an ``lrcompile.LatentKVCache`` of the same capacity.

In each subprocess, after the model is ready (for ``lowrank*``: after the first
compiled call, which factors the layers and frees the dense weights), a prefill
of ``[B, L]`` held-out tokens runs with a fresh ``DynamicCache``
(``use_cache=True``). Measured:

* **weight bytes**: ``lrcompile.weight_bytes(model)``, the bytes of the storages
  of the model's parameters (factors, plus what stays dense);
* **KV-cache bytes**: the sum of the storages of the ``DynamicCache`` tensors after
  the prefill; for ``lowrank_kv`` the bytes the ``LatentKVCache`` allocated
  (latents, RoPE positions, fill levels) for as many tokens;
* **RSS**: ``ru_maxrss`` (the process's peak resident set) right after imports,
  after compression and at the end, and ``VmRSS`` (current) at the end; "above
  baseline" subtracts the RSS after imports (torch alone is a few hundred MB);
  finally ``VmRSS`` again after glibc's ``malloc_trim(0)``, which returns memory
  the program freed but the allocator kept (calibration's temporaries), i.e. what
  live objects hold.

Run from the repository root::

    python -m benchmarks.memory             # small and medium fixtures, ~3 min
    python -m benchmarks.memory --quick     # tiny fixture

Writes ``docs/results/memory.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

from benchmarks.common import (
    ROOT,
    command_line,
    fmt,
    machine_info,
    pyplot,
    resolve_out,
    run_child,
    save_figure,
    set_threads,
    table,
    write_json,
    write_markdown,
)

CONFIGS = ("dense", "dense_compiled", "lowrank", "lowrank_loaded", "lowrank_kv")
REFERENCE = "dense_compiled"  # RSS ratios: same Dynamo capture, no compression
MiB = 1 << 20


def _maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _vmrss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _trimmed_rss() -> int | None:
    """VmRSS after glibc's ``malloc_trim(0)``: memory freed by the program but still held by the allocator
    is given back first, so this is what live objects occupy. None where glibc is not available."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return None
    return _vmrss()


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration, measured in this (fresh) process."""
    import gc

    import torch
    from transformers import DynamicCache

    import lrcompile
    import lrcompile.backend  # noqa: F401 - import everything the compile needs before the baseline
    import lrcompile.pipeline  # noqa: F401
    from benchmarks.fixtures import calibration_chunks, heldout_chunks, load_fixture

    fixture = load_fixture(args.fixture)
    calibration = calibration_chunks(fixture, args.seq_len, args.calib_batches, args.batch)
    ids = heldout_chunks(fixture, args.seq_len, 1, args.batch)[0]
    gc.collect()
    out: dict[str, Any] = {"config": args.child, "fixture": args.fixture, "rss_baseline": _vmrss(),
                           "maxrss_baseline": _maxrss()}
    if args.child == "lowrank_loaded":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.plan_dir).eval()  # compressed from the start
    else:
        model = fixture.load_model()
    out["weight_bytes_loaded"] = lrcompile.weight_bytes(model)
    out["maxrss_after_load"] = _maxrss()
    start = time.perf_counter()
    with torch.no_grad():
        if args.child == "dense":
            forward = model
        elif args.child == "dense_compiled":
            torch._dynamo.reset()
            forward = torch.compile(model, backend="eager", dynamic=False)
            forward(input_ids=calibration[0], past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
        else:
            latent = args.child == "lowrank_kv"
            config = lrcompile.LowRankConfig(
                calibration=calibration if args.child != "lowrank_loaded" else None, param_ratio=args.param_ratio,
                method=args.method, allocation=args.allocation, compiler="eager",
                kv_ratio=args.kv_ratio if latent else None,
            )
            torch._dynamo.reset()
            forward = torch.compile(model, backend="lowrank", options=config, dynamic=False)
            if latent:
                forward(input_ids=calibration[0], use_cache=False)
            else:
                forward(input_ids=calibration[0], past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
            if args.child == "lowrank":
                model.save_pretrained(args.plan_dir)
        out["prepare_s"] = time.perf_counter() - start
        gc.collect()
        out["weight_bytes"] = lrcompile.weight_bytes(model)
        out["maxrss_after_prepare"] = _maxrss()
        out["rss_after_prepare"] = _vmrss()
        if args.child == "lowrank_kv":
            cache = lrcompile.LatentKVCache(model, args.batch, args.seq_len)
            forward(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            out["kv_bytes"] = cache.latent_bytes
            out["kv_dense_same_capacity"] = cache.dense_bytes()
            out["kv_shape"] = [list(cache.layers[0].k_latent.shape), list(cache.layers[0].v_latent.shape)]
        else:
            cache = DynamicCache()
            forward(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            storages = {}
            for layer in cache.layers:
                for t in (layer.keys, layer.values):
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            out["kv_bytes"] = sum(storages.values())
            out["kv_shape"] = list(cache.layers[0].keys.shape)
        out["kv_layers"] = len(cache.layers)
        gc.collect()
        out["rss_end"] = _vmrss()
        out["maxrss_end"] = _maxrss()
        out["rss_end_trimmed"] = _trimmed_rss()
    if args.child.startswith("lowrank"):
        out["report"] = lrcompile.model_report(model).totals()
    out["num_params_dense"] = fixture.num_params
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_total = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": str(args.threads)}
    results = []
    for fixture in args.fixtures:
        with tempfile.TemporaryDirectory(prefix="lrcompile-memory-") as plan_dir:
            for config in CONFIGS:
                start = time.perf_counter()
                result = run_child("benchmarks.memory", [
                    "--child", config, "--fixture", fixture, "--plan-dir", plan_dir, "--batch", str(args.batch),
                    "--seq-len", str(args.seq_len), "--calib-batches", str(args.calib_batches),
                    "--param-ratio", str(args.param_ratio), "--method", args.method, "--allocation", args.allocation,
                    "--kv-ratio", str(args.kv_ratio), "--threads", str(args.threads)], env,
                    f"configuration {config} on {fixture}")
                result["wall_s"] = time.perf_counter() - start
                results.append(result)
                print(f"memory {fixture:6s} {config:15s}: weights {result['weight_bytes'] / MiB:8.2f} MiB, "
                      f"KV {result['kv_bytes'] / MiB:6.2f} MiB, peak RSS {result['maxrss_end'] / MiB:7.1f} MiB "
                      f"(+{(result['maxrss_end'] - result['rss_baseline']) / MiB:.1f} over baseline), "
                      f"{result['wall_s']:.0f} s", flush=True)
    return {
        "machine": machine_info(),
        "command": command_line("benchmarks.memory", args.argv),
        "settings": {"fixtures": args.fixtures, "batch": args.batch, "seq_len": args.seq_len,
                     "calibration": f"{args.calib_batches} x [{args.batch}, {args.seq_len}] train tokens",
                     "param_ratio": args.param_ratio, "method": args.method, "allocation": args.allocation,
                     "kv_ratio": args.kv_ratio,
                     "compiler": "eager", "dtype": "float32"},
        "results": results,
        "total_wall_s": time.perf_counter() - t_total,
    }


def _find(results: list[dict], fixture: str, config: str) -> dict | None:
    return next((r for r in results if r["fixture"] == fixture and r["config"] == config), None)


def plot_memory(payload: dict[str, Any], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fixtures = payload["settings"]["fixtures"]
    metrics = (("weight_bytes", "weights (weight_bytes)"), ("kv_bytes", "KV cache after prefill"),
               ("peak_above", "peak RSS above import baseline"), ("steady_above", "RSS at end above baseline"),
               ("trimmed_above", "RSS at end after malloc_trim"))
    fig, axes = plt.subplots(1, len(fixtures), figsize=(7 * len(fixtures), 4.4), squeeze=False)
    colors = {"dense": "tab:gray", "dense_compiled": "black", "lowrank": "tab:blue", "lowrank_loaded": "tab:green",
              "lowrank_kv": "tab:purple"}
    width = 0.8 / len(CONFIGS)
    for ax, fixture in zip(axes[0], fixtures):
        for j, config in enumerate(CONFIGS):
            r = _find(payload["results"], fixture, config)
            if r is None:
                continue
            values = [r["weight_bytes"], r["kv_bytes"], r["maxrss_end"] - r["rss_baseline"], r["rss_end"] - r["rss_baseline"],
                      (r.get("rss_end_trimmed") or r["rss_end"]) - r["rss_baseline"]]
            ax.bar([i + (j - (len(CONFIGS) - 1) / 2) * width for i in range(len(metrics))], [v / MiB for v in values], width,
                   label=config, color=colors[config])
        ax.set_xticks(range(len(metrics)), [m[1] for m in metrics], rotation=15, fontsize=8)
        ax.set_ylabel("MiB")
        ax.set_title(f"{fixture} fixture")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    s = payload["settings"]
    fig.suptitle(f"Measured memory, {s['method']}/{s['allocation']} @ {s['param_ratio']}, prefill {s['batch']} x {s['seq_len']}")
    return save_figure(fig, path)


def _trim_ratio(r: dict[str, Any], ref: dict[str, Any]) -> str:
    if r.get("rss_end_trimmed") is None or ref.get("rss_end_trimmed") is None:
        return "-"
    return f"{(r['rss_end_trimmed'] - r['rss_baseline']) / max(1, ref['rss_end_trimmed'] - ref['rss_baseline']):.3f}"


def _trim_mib(r: dict[str, Any]) -> str:
    return "-" if r.get("rss_end_trimmed") is None else f"{(r['rss_end_trimmed'] - r['rss_baseline']) / MiB:.1f}"


def write_memory_markdown(payload: dict[str, Any], path: Path, plot: bool) -> None:
    s = payload["settings"]
    rows, ratio_rows = [], []
    for fixture in s["fixtures"]:
        dense = _find(payload["results"], fixture, "dense")
        ref = _find(payload["results"], fixture, REFERENCE) or dense
        for config in CONFIGS:
            r = _find(payload["results"], fixture, config)
            if r is None:
                continue
            rows.append([fixture, config, f"{r['weight_bytes']:,}", f"{r['kv_bytes']:,}",
                         f"{r['maxrss_end'] / MiB:.1f}", f"{(r['maxrss_end'] - r['rss_baseline']) / MiB:.1f}",
                         f"{r['rss_end'] / MiB:.1f}", f"{(r['rss_end'] - r['rss_baseline']) / MiB:.1f}", _trim_mib(r),
                         f"{(r['maxrss_after_prepare'] - r['rss_baseline']) / MiB:.1f}", fmt(r["prepare_s"], 1)])
            if dense is not None and config.startswith("lowrank"):
                ratio_rows.append([
                    fixture, config, f"**{r['weight_bytes'] / dense['weight_bytes']:.3f}**",
                    fmt((r.get("report") or {}).get("weight_bytes_ratio"), 3),
                    f"{r['kv_bytes'] / dense['kv_bytes']:.3f}",
                    f"{(r['maxrss_end'] - r['rss_baseline']) / max(1, ref['maxrss_end'] - ref['rss_baseline']):.3f}",
                    f"{(r['rss_end'] - r['rss_baseline']) / max(1, ref['rss_end'] - ref['rss_baseline']):.3f}",
                    _trim_ratio(r, ref),
                ])
    shape = payload["results"][0]["kv_shape"] if payload["results"] else "?"
    body = [
        f"- fixtures: {', '.join(s['fixtures'])} (float32); compressed = `LowRankConfig(param_ratio={s['param_ratio']}, "
        f"method='{s['method']}', allocation='{s['allocation']}', compiler='eager')`, calibrated on {s['calibration']}",
        "- one subprocess per row; `lowrank_loaded` = `from_pretrained` of the `lowrank` row's model saved with "
        "`save_pretrained`, no calibration",
        f"- KV cache: `DynamicCache` after a prefill of {s['batch']} x {s['seq_len']} held-out tokens (per layer K and V "
        f"of shape {shape}); `lowrank_kv`: `LatentKVCache` of the same capacity, kv_ratio {s.get('kv_ratio')} "
        "(latents and a fill level per layer, plus one int64 RoPE position per token shared by all layers)",
        "- weight bytes: `lrcompile.weight_bytes(model)` (parameter storages: factors + what stays dense). "
        "Peak = `ru_maxrss` at the end of the process; baseline = RSS after imports, before the model is loaded",
        "",
        "## Ratios to dense",
        "",
        f"Weight and KV ratios are to `dense`; RSS ratios to `{REFERENCE}` (same Dynamo capture, no compression).",
        "",
        table(["fixture", "config", "weight bytes", "compressible linears (report)", "KV bytes", "peak RSS above baseline",
               "RSS at end above baseline", "RSS at end after malloc_trim above baseline"], ratio_rows, "ll" + "r" * 6),
        "",
        "## Measured",
        "",
        table(["fixture", "config", "weight bytes", "KV bytes", "peak RSS MiB", "peak above baseline MiB", "RSS at end MiB",
               "RSS at end above baseline MiB", "after malloc_trim above baseline MiB",
               "peak above baseline after compression MiB", "prepare s"], rows, "ll" + "r" * 9),
        "",
    ]
    if plot:
        body += ["![memory](memory.png)"]
    write_markdown(path, "Memory: weights, KV cache and peak RSS, compressed vs dense", payload, body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixtures", nargs="+", default=["small", "medium"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--param-ratio", type=float, default=0.8)
    parser.add_argument("--kv-ratio", type=float, default=0.5, help="kv_ratio of the lowrank_kv row")
    parser.add_argument("--method", default="whiten")
    parser.add_argument("--allocation", default="closed_form")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny fixture only")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default docs/results)")
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--fixture", help=argparse.SUPPRESS)
    parser.add_argument("--plan-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = argv
    set_threads(args.threads)
    if args.child:
        result = child(args)
        Path(args.result).write_text(json.dumps(result))
        return 0
    if args.quick:
        args.fixtures = ["tiny"]
    out = resolve_out(args.out, args.quick)
    payload = run(args)
    write_json(out / "memory.json", payload)
    plot = plot_memory(payload, out / "memory.png")
    write_memory_markdown(payload, out / "memory.md", plot)
    print((out / "memory.md").read_text().split("<!-- analysis -->")[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
