"""Compile cost: wall time of each phase of ``backend="lowrank"``, and its growth with model size.

For each fixture (``tiny``, ``small``, ``medium``: 0.3M, 3.9M, 27M parameters)
three configurations, and for SmolLM2-135M-Instruct (``smollm2``, the real
model of ``lrcompile demo``) the dense one and ``lrcompile demo``'s default, are compiled, each in its own subprocess with an empty
Inductor cache folder (``TORCHINDUCTOR_CACHE_DIR``), so every compile is cold
and none reuses another's kernels; a trivial ``torch.compile`` runs first in each
subprocess so one-time process start-up (Inductor imports, compiler checks,
worker pool, ~15 s cold here) is not charged to the model:

* ``dense``: ``torch.compile(model, backend=<Inductor>)``, Inductor's ``compile_fx`` timed;
* ``closed_form``: ``backend="lowrank"``, ``whiten`` / ``closed_form`` @ 0.8, ``compiler="inductor"``;
* ``sensitivity``: ``backend="lowrank"``, ``whiten`` / ``sensitivity`` @ 0.8 (ASVD's KL search,
  9 ratios per layer on 1 batch), ``compiler="eager"``: the allocation does not change
  the rewritten graph's size, so Inductor's time is measured once (``closed_form`` row);
* ``demo`` (SmolLM2 only): the options of ``lrcompile demo`` (weights and latent KV), ``compiler="inductor"``.

The first call is a plain forward (``use_cache=False``) of ``input_ids [4, 128]`` (calibration: 4
batches of that shape). Phases:

* per-pass wall times returned by ``lrcompile.pipeline.compress_graph``
  (``GraphCompression.timings``: find_linears, apply_recorded, activation_stats
  (calibration forwards with observers), sensitivity, allocate_ranks (includes the
  SVDs for closed_form), factorize_linears (SVDs + rewrite), release_dense);
* downstream: ``lrcompile.backend.compile_downstream`` (Inductor), timed by wrapping it;
* Dynamo capture ~= first-call time - backend time - one steady-state call
  (median of 3 later calls).

Run from the repository root::

    python -m benchmarks.compile_cost            # ~15 min
    python -m benchmarks.compile_cost --quick    # tiny fixture, no sensitivity

Writes ``docs/results/compile_cost.{json,md,png}``.
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
    CompileRecorder,
    ROOT,
    command_line,
    fmt,
    machine_info,
    median,
    pyplot,
    resolve_out,
    run_child,
    save_figure,
    set_threads,
    table,
    write_json,
    write_markdown,
)

CONFIGS = ("dense", "closed_form", "sensitivity", "demo")
SMOLLM2 = "smollm2"  # the real pretrained model of ``lrcompile demo``, next to the trained fixtures


def _model(name: str, seq_len: int, calib_batches: int, batch: int) -> tuple[Any, list, dict[str, Any]]:
    """``(fresh float32 model, calibration batches, size facts)`` of a fixture or of SmolLM2."""
    if name == SMOLLM2:
        from lrcompile.cli import SMOLLM2_PACKAGE, open_model_folder
        from lrcompile.text_data import packed_token_batches, stdlib_sentences

        opened = open_model_folder(SMOLLM2_PACKAGE, "generate")
        batches = packed_token_batches(opened.tokenizer, stdlib_sentences("calibration", 1500), batch, seq_len, calib_batches)
        model = opened.load()
        facts = {"num_params": sum(p.numel() for p in model.parameters()), "layers": opened.config.num_hidden_layers,
                 "hidden": opened.config.hidden_size}
        return model, [b["input_ids"] for b in batches], facts
    from benchmarks.fixtures import calibration_chunks, load_fixture

    fixture = load_fixture(name)
    facts = {"num_params": fixture.num_params, "layers": fixture.recipe.layers, "hidden": fixture.recipe.hidden}
    return fixture.load_model(), calibration_chunks(fixture, seq_len, calib_batches, batch), facts


def _options(config: str, args: argparse.Namespace) -> dict[str, Any]:
    """The lowrank options of a configuration row (``demo``: ``lrcompile demo``'s defaults, compiled by Inductor)."""
    if config == "demo":
        from lrcompile.cli import DEMO_DEFAULTS

        demo = {k: v for k, v in DEMO_DEFAULTS["smollm2"].items() if k != "seq_len"}
        return {**demo, "compiler": "inductor"}
    return {"param_ratio": args.param_ratio, "method": args.method, "allocation": config,
            "compiler": "inductor" if config == "closed_form" else "eager", "sensitivity_batches": 1}


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import lrcompile
    import lrcompile.backend  # noqa: F401
    from lrcompile.pipeline import PASSES

    start = time.perf_counter()
    if args.child != "sensitivity":  # the only row without Inductor needs no warm-up
        torch.compile(lambda x: torch.sin(x) + 1, backend="inductor")(torch.randn(8))  # process start-up, not the model
    warmup_s = time.perf_counter() - start
    torch._dynamo.reset()
    model, calibration, facts = _model(args.fixture, args.seq_len, args.calib_batches, args.batch)
    options = {} if args.child == "dense" else _options(args.child, args)
    recorder = CompileRecorder()
    if args.child == "dense":
        compiled = torch.compile(model, backend=recorder.dense_backend(), dynamic=False)
    else:
        config = lrcompile.LowRankConfig(calibration=calibration, **options)
        compiled = torch.compile(model, backend="lowrank", options=config, dynamic=False)
    x = calibration[0]
    with recorder.active(), torch.no_grad():
        start = time.perf_counter()
        compiled(input_ids=x, use_cache=False)  # a latent-KV model runs a dense cache only through LatentKVCache
        first_s = time.perf_counter() - start
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            compiled(input_ids=x, use_cache=False)
            runs.append(time.perf_counter() - start)
    totals = recorder.totals()
    run_s = median(runs)
    out = {
        "fixture": args.fixture,
        "config": args.child,
        **facts,
        "options": options,
        "graphs": len(recorder.graphs),
        "process_warmup_s": warmup_s,
        "first_call_s": first_s,
        "steady_call_s": run_s,
        "backend_compress_s": totals["compress_s"],
        "downstream_s": totals["downstream_s"],
        "passes_s": {p.name: totals.get(f"pass_{p.name}_s", 0.0) for p in PASSES},
        "dynamo_capture_s": first_s - totals["compress_s"] - totals["downstream_s"] - run_s,
        "compiler": options.get("compiler", "inductor"),
    }
    if args.child != "dense":
        out["report"] = lrcompile.model_report(model).totals()
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_total = time.perf_counter()
    results = []
    for fixture, config in rows(args.fixtures, args.configs):
        with tempfile.TemporaryDirectory(prefix="lrcompile-inductor-cache-") as cache_dir:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir, "OMP_NUM_THREADS": str(args.threads),
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
            start = time.perf_counter()
            result = run_child("benchmarks.compile_cost", [
                "--child", config, "--fixture", fixture, "--batch", str(args.batch), "--seq-len", str(args.seq_len),
                "--calib-batches", str(args.calib_batches), "--param-ratio", str(args.param_ratio),
                "--method", args.method, "--threads", str(args.threads)], env, f"{config} on {fixture}")
        result["process_wall_s"] = time.perf_counter() - start
        results.append(result)
        print(f"compile_cost {fixture:6s} {config:11s}: first call {result['first_call_s']:6.1f} s "
              f"(capture {result['dynamo_capture_s']:.1f}, backend {result['backend_compress_s']:.1f}, "
              f"downstream {result['downstream_s']:.1f}), process {result['process_wall_s']:.0f} s", flush=True)
    return {
        "machine": machine_info(),
        "command": command_line("benchmarks.compile_cost", args.argv),
        "settings": {"fixtures": args.fixtures, "configs": args.configs, "batch": args.batch, "seq_len": args.seq_len,
                     "calibration": f"{args.calib_batches} x [{args.batch}, {args.seq_len}] train tokens",
                     "param_ratio": args.param_ratio, "method": args.method, "sensitivity_batches": 1,
                     "inductor_cache": "empty per configuration (cold compile)"},
        "results": results,
        "total_wall_s": time.perf_counter() - t_total,
    }


def _find(results: list[dict], fixture: str, config: str) -> dict | None:
    return next((r for r in results if r["fixture"] == fixture and r["config"] == config), None)


PHASES = (("dynamo_capture_s", "Dynamo capture"), ("activation_stats", "statistics (calibration)"),
          ("sensitivity", "sensitivity (KL search)"), ("allocate_ranks", "allocation"),
          ("factorize_linears", "factoring (SVD + rewrite)"), ("latent_kv", "latent KV (K/V factoring + rewrite)"),
          ("other_passes", "other passes"), ("downstream_s", "Inductor"))
LATENT_KV_PASSES = ("find_attention", "kv_metrics", "kv_fisher", "kv_sensitivity", "restructure_attention")


def rows(fixtures: list[str], configs: list[str]) -> list[tuple[str, str]]:
    """(model, config) pairs: ``demo`` runs on SmolLM2 only, ``closed_form`` / ``sensitivity`` on the fixtures only."""
    return [(f, c) for f in fixtures for c in configs if c == "dense" or (c == "demo") == (f == SMOLLM2)]


def phases(r: dict[str, Any]) -> dict[str, float]:
    p = r["passes_s"]
    named = ("activation_stats", "sensitivity", "allocate_ranks", "factorize_linears")
    return {"dynamo_capture_s": max(0.0, r["dynamo_capture_s"]), **{k: p.get(k, 0.0) for k in named},
            "latent_kv": sum(p.get(k, 0.0) for k in LATENT_KV_PASSES),
            "other_passes": sum(v for k, v in p.items() if k not in named and k not in LATENT_KV_PASSES),
            "downstream_s": r["downstream_s"]}


def plot_cost(payload: dict[str, Any], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fixtures, configs = payload["settings"]["fixtures"], payload["settings"]["configs"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    ax = axes[0]
    labels, bottoms, x = [], {}, 0
    colors = dict(zip([k for k, _ in PHASES], ["tab:gray", "tab:blue", "tab:red", "tab:purple", "tab:orange", "tab:cyan", "tab:olive",
                                                  "tab:green"]))
    positions = []
    for fixture in fixtures:
        for config in configs:
            r = _find(payload["results"], fixture, config)
            if r is None:
                continue
            positions.append((x, r))
            labels.append(f"{fixture}\n{config}")
            x += 1
        x += 0.5
    for key, name in PHASES:
        ax.bar([p for p, _ in positions], [phases(r)[key] for _, r in positions],
               bottom=[bottoms.get(p, 0.0) for p, _ in positions], color=colors[key], label=name)
        for p, r in positions:
            bottoms[p] = bottoms.get(p, 0.0) + phases(r)[key]
    ax.set_xticks([p for p, _ in positions], labels, fontsize=7, rotation=35, ha="right")
    ax.set_ylim(0, 1.06 * max(bottoms.values(), default=1.0))
    ax.set_ylabel("seconds (cold)")
    ax.set_title("first compiled call, by phase")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    ax = axes[1]
    for config, marker in zip(configs, "osD"):
        pts = [(r["num_params"], sum(phases(r).values())) for f in fixtures if (r := _find(payload["results"], f, config))]
        if pts:
            what = "backend passes + capture, no Inductor" if config == "sensitivity" else "first call"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=f"{config} ({what})")
    pts = [(r["num_params"], r["downstream_s"]) for f in fixtures if (r := _find(payload["results"], f, "closed_form"))]
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], ls="--", marker="x", label="closed_form: Inductor only")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("model parameters")
    ax.set_ylabel("seconds")
    ax.set_title("growth with model size (tiny / small / medium)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def write_cost_markdown(payload: dict[str, Any], path: Path, plot: bool) -> None:
    s = payload["settings"]
    rows = []
    for r in payload["results"]:
        ph = phases(r)
        rows.append([r["fixture"], f"{r['num_params']:,}", r["config"], *[fmt(ph[k], 2) for k, _ in PHASES],
                     fmt(sum(ph.values()), 1), fmt(r["first_call_s"], 1), fmt(r["steady_call_s"], 3)])
    growth = []
    for config in s["configs"]:
        base = _find(payload["results"], s["fixtures"][0], config)
        for fixture in s["fixtures"][1:]:
            r = _find(payload["results"], fixture, config)
            if base and r:
                growth.append([config, f"{s['fixtures'][0]} -> {fixture}", f"{r['num_params'] / base['num_params']:.1f}x",
                               f"{r['first_call_s'] / base['first_call_s']:.1f}x",
                               f"{sum(phases(r).values()) - phases(r)['downstream_s']:.1f} s vs "
                               f"{sum(phases(base).values()) - phases(base)['downstream_s']:.1f} s"])
    sens_rows = []
    for fixture in s["fixtures"]:
        cf, se = _find(payload["results"], fixture, "closed_form"), _find(payload["results"], fixture, "sensitivity")
        if cf and se:
            cf_alloc = cf["passes_s"].get("allocate_ranks", 0.0)
            se_alloc = se["passes_s"].get("sensitivity", 0.0) + se["passes_s"].get("allocate_ranks", 0.0)
            sens_rows.append([fixture, fmt(cf_alloc, 2), fmt(se_alloc, 1), f"{se_alloc / max(cf_alloc, 1e-9):.0f}x",
                              fmt(cf["backend_compress_s"], 1), fmt(se["backend_compress_s"], 1)])
    body = [
        f"- fixtures: {', '.join(s['fixtures'])}; first call = forward of `input_ids [{s['batch']}, {s['seq_len']}]`, "
        f"calibration {s['calibration']}; `method='{s['method']}'`, param ratio {s['param_ratio']}; "
        "`torch.compile(..., dynamic=False)`",
        "- each row in its own subprocess with an empty Inductor cache (cold compile); a trivial compile first pays "
        "the process start-up",
        "- `sensitivity` rows use `compiler='eager'` (no Inductor): Inductor's time does not depend on the allocation "
        "and is in the `closed_form` row",
        "- Dynamo capture = first call - backend - one steady-state call (an estimate: it also holds guard building "
        "and AOT tracing done outside the timed functions)",
        "",
        "## Phases of the first compiled call (s)",
        "",
        table(["fixture", "params", "config", *[n for _, n in PHASES], "sum", "first call", "steady call"], rows,
              "lrl" + "r" * (len(PHASES) + 3)),
        "",
        "## Allocation cost: sensitivity (KL search) vs closed_form",
        "",
        "closed_form: the allocate_ranks pass (SVD spectra of every layer + a greedy split). sensitivity: the "
        "sensitivity pass (one full forward per layer and candidate ratio) + allocate_ranks.",
        "",
        table(["fixture", "closed_form allocation s", "sensitivity allocation s", "sensitivity / closed_form",
               "closed_form backend total s", "sensitivity backend total s"], sens_rows, "lrrrrr"),
        "",
        "## Growth with model size",
        "",
        table(["config", "fixtures", "parameters", "first call", "non-Inductor time"], growth, "llrrr"),
        "",
    ]
    if plot:
        body += ["![compile cost](compile_cost.png)"]
    write_markdown(path, "Compile cost of the lowrank backend, by phase and model size (CPU)", payload, body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixtures", nargs="+", default=["tiny", "small", "medium", SMOLLM2],
                        help=f"trained fixtures and/or {SMOLLM2} (the demo's real model)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--param-ratio", type=float, default=0.8)
    parser.add_argument("--method", default="whiten")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny fixture; dense and closed_form only")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default docs/results)")
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--fixture", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = argv
    set_threads(args.threads)
    if args.child:
        import logging

        logging.getLogger("lrcompile").setLevel(logging.WARNING)
        Path(args.result).write_text(json.dumps(child(args)))
        return 0
    if args.quick:
        args.fixtures, args.configs = ["tiny"], ["dense", "closed_form"]
    out = resolve_out(args.out, args.quick)
    payload = run(args)
    write_json(out / "compile_cost.json", payload)
    plot = plot_cost(payload, out / "compile_cost.png")
    write_cost_markdown(payload, out / "compile_cost.md", plot)
    print((out / "compile_cost.md").read_text().split("<!-- analysis -->")[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
