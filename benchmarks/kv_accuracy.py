"""Held-out perplexity of the trained Llama fixture with a latent KV cache (Palu), per kv_ratio, allocation and group size.

For each ``kv_ratio`` in 1.0 / 0.75 / 0.5 / 0.25, each allocation (``uniform``,
``fisher``, ``sensitivity``) and each group size (1, 2, all KV heads), the fixture is compiled
with ``backend="lowrank"`` (``param_ratio=1.0``: only attention is
restructured), calibrated on train-split tokens (sensitivity on the first batch), and evaluated on held-out
chunks without a cache (the same latent attention op the cache path runs).

    python -m benchmarks.kv_accuracy            # small fixture, ~10 min
    python -m benchmarks.kv_accuracy --quick    # tiny fixture, two configurations

Writes ``docs/results/kv_accuracy.{json,md,png}``.
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

from benchmarks.common import (
    command_line,
    machine_info,
    pyplot,
    resolve_out,
    save_figure,
    set_threads,
    table,
    write_json,
    write_markdown,
)

KV_RATIOS = (1.0, 0.75, 0.5, 0.25)
ALLOCATIONS = ("uniform", "fisher", "sensitivity")
GROUPS = ("1", "2", "all")


def run_config(fixture, calibration, heldout, kv_ratio: float, allocation: str, group: str, method: str) -> dict[str, Any]:
    import lrcompile
    from benchmarks.fixtures import perplexity
    from lrcompile.modules import model_latent_attention

    torch._dynamo.reset()
    model = fixture.load_model()
    config = lrcompile.LowRankConfig(calibration=calibration, param_ratio=1.0, kv_ratio=kv_ratio, method=method,
                                     kv_allocation=allocation, kv_group_size=group if group == "all" else int(group),
                                     compiler="eager", sensitivity_batches=1)
    compiled = torch.compile(model, backend="lowrank", options=config, dynamic=False)
    start = time.perf_counter()
    with torch.no_grad():
        compiled(input_ids=calibration[0], use_cache=False)
        compress_s = time.perf_counter() - start
        ppl = perplexity(lambda ids: compiled(input_ids=ids, use_cache=False).logits, heldout)
    layers = [layer for _, layer in model_latent_attention(model)]
    latent = sum(layer.latent_width for layer in layers)
    dense = sum(layer.dense_width for layer in layers)
    return {
        "kv_ratio": kv_ratio, "allocation": allocation, "group_size": group, "method": method, "ppl": ppl,
        "achieved_kv_ratio": latent / dense, "ranks": [(layer.k_rank, layer.v_rank) for layer in layers],
        "compress_s": round(compress_s, 2),
    }


def plot(results: list[dict], dense_ppl: float, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for allocation in ALLOCATIONS:
        for group in GROUPS:
            rows = sorted((r for r in results if r["allocation"] == allocation and r["group_size"] == group),
                          key=lambda r: r["kv_ratio"])
            if rows:
                ax.plot([r["kv_ratio"] for r in rows], [r["ppl"] for r in rows], marker="o",
                        linestyle={"uniform": "--", "fisher": "-", "sensitivity": ":"}[allocation], label=f"{allocation}, group {group}")
    ax.axhline(dense_ppl, color="gray", linewidth=0.8, label="dense")
    ax.set_xlabel("kv_ratio (latent / dense K+V values per token)")
    ax.set_ylabel("held-out perplexity")
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kv_accuracy", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny fixture, kv_ratio 0.5, group 1, every allocation")
    parser.add_argument("--fixture", default=None, help="fixture name (default small; tiny with --quick)")
    parser.add_argument("--method", default="asvd", choices=("svd", "asvd", "whiten"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.getLogger("lrcompile").setLevel(logging.WARNING)
    set_threads(args.threads)
    out = resolve_out(args.out, args.quick)
    from benchmarks.fixtures import calibration_chunks, heldout_chunks, load_fixture, perplexity

    start_total = time.perf_counter()
    fixture = load_fixture(args.fixture or ("tiny" if args.quick else "small"))
    seq_len = min(256, fixture.recipe.seq_len)
    calibration = calibration_chunks(fixture, seq_len, 4 if args.quick else 8, 4)
    heldout = heldout_chunks(fixture, seq_len, 4 if args.quick else 16, 4)
    with torch.no_grad():
        dense = fixture.load_model()
        dense_ppl = perplexity(lambda ids: dense(input_ids=ids, use_cache=False).logits, heldout)
    configs = [(0.5, a, "1") for a in ALLOCATIONS] if args.quick else [
        (r, a, g) for r in KV_RATIOS for a in ALLOCATIONS for g in GROUPS if r < 1.0 or a == "uniform"]
    results = []
    for kv_ratio, allocation, group in configs:
        results.append(run_config(fixture, calibration, heldout, kv_ratio, allocation, group, args.method))
        r = results[-1]
        print(f"kv_ratio {kv_ratio:<5} {allocation:<8} group {group:<4} ppl {r['ppl']:8.3f} "
              f"(achieved {r['achieved_kv_ratio']:.3f}, {r['compress_s']:.1f} s)", flush=True)
    payload = {
        "machine": machine_info(), "command": command_line("benchmarks.kv_accuracy", argv),
        "total_wall_s": time.perf_counter() - start_total,
        "settings": {"fixture": fixture.recipe.name, "method": args.method, "seq_len": seq_len, "param_ratio": 1.0,
                     "calibration_batches": len(calibration), "heldout_batches": len(heldout), "batch": 4},
        "dense_ppl": dense_ppl, "results": results,
    }
    write_json(out / "kv_accuracy.json", payload)
    plotted = plot(results, dense_ppl, out / "kv_accuracy.png")
    rows = [[r["kv_ratio"], r["allocation"], r["group_size"], f"{r['ppl']:.3f}", f"{r['ppl'] / dense_ppl:.3f}",
             f"{r['achieved_kv_ratio']:.3f}", " ".join(f"{k}/{v}" for k, v in r["ranks"]), r["compress_s"]]
            for r in results]
    body = [
        f"- fixture `{fixture.recipe.name}` ({fixture.info['num_params']:,} parameters, "
        f"{fixture.recipe.heads} heads / {fixture.recipe.kv_heads} KV heads, head dim "
        f"{fixture.recipe.hidden // fixture.recipe.heads}); method `{args.method}`, `param_ratio=1.0` (attention only), "
        f"calibration {len(calibration)} x [4, {seq_len}] train tokens; held-out {len(heldout)} x [4, {seq_len}] tokens",
        "- kv_ratio 1.0 is run once per group size (`uniform`; every allocation is full rank there)",
        f"- dense perplexity: **{dense_ppl:.3f}**",
        "",
        table(["kv_ratio", "allocation", "group size", "ppl", "ppl / dense", "achieved kv_ratio",
               "K/V rank per group, per layer", "compress s"], rows, "rllrrrlr"),
        "",
    ] + (["![perplexity vs kv_ratio](kv_accuracy.png)", ""] if plotted else [])
    write_markdown(out / "kv_accuracy.md", "Latent KV cache: held-out perplexity per kv_ratio, allocation and group size",
                   payload, body)
    print(f"dense ppl {dense_ppl:.3f}; wrote {out / 'kv_accuracy.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
