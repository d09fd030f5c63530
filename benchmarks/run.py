"""Run every lrcompile benchmark and index the results.

``python -m benchmarks.run`` runs, on this machine:

1. **accuracy** (:mod:`benchmarks.accuracy`): held-out perplexity of the trained
   ``small`` Llama fixture for ``svd`` / ``asvd`` / ``whiten`` x ``uniform`` /
   ``sensitivity`` / ``closed_form`` at param ratios 1.0 (once per method),
   0.95, 0.9, 0.85, 0.8; and the MiniLM embedding fidelity at the same ratios
   (functions of :mod:`benchmarks.minilm_fidelity`), in a parallel subprocess;
2. **kv accuracy** (:mod:`benchmarks.kv_accuracy`): held-out perplexity with a
   latent KV cache per kv_ratio (1.0 / 0.75 / 0.5 / 0.25), allocation and group size;
   **smollm2** (:mod:`benchmarks.smollm2`): the real SmolLM2-135M-Instruct per weight,
   KV and combined configuration (perplexity, time, peak RSS, greedy agreement);
3. **memory** (:mod:`benchmarks.memory`): measured weight and KV-cache bytes and
   peak RSS, one subprocess per configuration;
4. **speed** (:mod:`benchmarks.speed`): prefill and decode throughput of the
   compressed model compiled with ``lowrank`` + Inductor against the same model
   compiled with Inductor alone, batch 1 and 8;
   **kv speed** (:mod:`benchmarks.kv_speed`): decode step time with a latent KV
   cache against a dense static cache;
5. **compile cost** (:mod:`benchmarks.compile_cost`): wall time per phase
   (Dynamo capture, statistics, sensitivity, factoring, Inductor) on the
   ``tiny`` / ``small`` / ``medium`` fixtures.

Accuracy (all parts) and memory do not measure time, so they run first and
side by side; speed and compile cost then run alone. Each writes
``docs/results/<name>.{json,md,png}``; this script prints their Markdown
tables and writes ``docs/results/README.md``, an index of every result file.

Options: ``--quick`` (a smoke run of every benchmark, ~5 min), ``--skip-minilm``,
``--only accuracy speed ...``, ``--out DIR``. Every sub-benchmark also runs
alone: ``python -m benchmarks.accuracy`` etc.

Helpers shared by the sub-benchmarks live in :mod:`benchmarks.common`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

from benchmarks.common import (
    ANALYSIS_MARKER,
    ROOT,
    command_line,
    kept_analysis,
    machine_info,
    machine_line,
    resolve_out,
    set_threads,
    write_json,
)

BENCHMARKS = ("accuracy", "kv_accuracy", "smollm2", "memory", "speed", "kv_speed", "compile_cost")

RESULT_FILES = (
    ("accuracy.md", "Perplexity of the trained `small` Llama fixture per method, allocation and param ratio"),
    ("kv_accuracy.md", "Perplexity with a latent KV cache per kv_ratio, allocation and group size"),
    ("smollm2.md", "SmolLM2-135M-Instruct: perplexity, compression time, peak RSS and greedy agreement per configuration"),
    ("accuracy_minilm.md", "MiniLM (all-MiniLM-L6-v2) embedding fidelity at ratios 0.95 / 0.9 / 0.85 / 0.8"),
    ("speed.md", "Prefill and decode throughput, `lowrank` + Inductor vs dense Inductor, batch 1 and 8"),
    ("kv_speed.md", "Decode step time with a latent KV cache vs a dense static cache, both compiled with Inductor"),
    ("memory.md", "Measured weight bytes, KV-cache bytes and peak RSS, compressed vs dense"),
    ("aq_speed.md", "AQLM linears on CPU: decode tokens/s of SmolLM2 with AQ 2x8 decoder linears vs dense Inductor "
     "(batch 1 and 8), op-level kernel times, profile"),
    ("compile_cost.md", "Compile time per pass on the tiny fixture and SmolLM2-135M (the demo's weights + latent-KV "
     "options under Inductor)"),
    ("latent_attention_kernel.md", "Triton latent-attention kernels vs dense SDPA and unfused reconstruction "
     "(CUDA only: `python -m benchmarks.latent_attention_kernel`)"),
    ("aq_linear_kernel.md", "Triton AQ linear kernels vs dense bf16 `F.linear` at Llama-2-7B shapes "
     "(CUDA only: `python -m benchmarks.aq_linear_kernel`)"),
    ("minilm_fidelity.md", "MiniLM embedding fidelity at ratios 0.9 / 0.8 with per-layer ranks (standalone benchmark)"),
    ("block_compression.md", "Block-by-block compression: SmolLM2 and `medium` fixture peak RSS in memory vs "
     "`--max-memory`, scaling with depth, calibration orders, block fine-tuning and end-to-end distillation on "
     "SmolLM2 (standalone: `python -m benchmarks.block_compression`)"),
    ("aqlm_accuracy.md", "AQLM (2x8, g=8) vs round-to-nearest g=128/64 at 2/3/4 bits on SmolLM2 and the `small` "
     "fixture: measured bits/weight, held-out perplexity, time per layer; AQ on low-rank factors vs factoring alone "
     "(own script: `python -m benchmarks.aqlm_accuracy --model smollm2|small`)"),
    ("fixtures.md", "The trained Llama fixtures (recipes, training, held-out perplexity)"),
)


def write_index(out: Path, summary: dict[str, Any]) -> Path:
    """``docs/results/README.md``: every result file with what it holds, plus the last run's summary."""
    lines = [
        "# Benchmark results",
        "",
        "All numbers are measured on the machine named in each file: this 2-core CPU machine, except the CUDA-only "
        "kernel benchmarks, measured on a lent H200 (`bash benchmarks/cuda_checks.sh`). "
        "`python -m benchmarks.run` regenerates the files below (except `minilm_fidelity.*` and `fixtures.md`, "
        "which have their own scripts: `python -m benchmarks.minilm_fidelity`, `python -m benchmarks.fixtures`). "
        "Each Markdown file has a JSON twin with every raw number and, where it makes sense, a PNG plot.",
        "",
        "| file | contents | data | plot |",
        "|---|---|---|---|",
    ]
    for name, what in RESULT_FILES:
        stem = name[:-3]
        md = out / name
        if not md.exists():
            lines.append(f"| {name} (not generated yet) | {what} | | |")
            continue
        data = f"[{stem}.json]({stem}.json)" if (out / f"{stem}.json").exists() else ""
        plot = f"[{stem}.png]({stem}.png)" if (out / f"{stem}.png").exists() else ""
        lines.append(f"| [{name}]({name}) | {what} | {data} | {plot} |")
    if summary:
        m = summary["machine"]
        lines += [
            "",
            "## Last full run",
            "",
            f"- date: {m['date']}",
            f"- machine: {machine_line(m)}",
            f"- command: `{summary['command']}`",
            "- wall time per benchmark (s): "
            + ", ".join(f"{k} {v:.0f}" for k, v in summary["wall_s"].items())
            + f"; total {summary['total_wall_s']:.0f} s",
        ]
        if summary.get("failed"):
            lines.append(f"- FAILED: {', '.join(summary['failed'])}")
    lines += ["", ANALYSIS_MARKER, "", kept_analysis(out / "README.md") or "_No hand-written summary yet._", ""]
    path = out / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _print_tables(out: Path, names: Sequence[str]) -> None:
    """Print the tables of each result Markdown (everything between the header and the analysis)."""
    for name in names:
        md = out / f"{name}.md"
        if not md.exists():
            continue
        text = md.read_text(encoding="utf-8").split(ANALYSIS_MARKER, 1)[0]
        print(f"\n======== {md.relative_to(ROOT) if md.is_relative_to(ROOT) else md} ========\n")
        print(text.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run of every benchmark (~5 min)")
    parser.add_argument("--skip-minilm", action="store_true", help="skip the MiniLM fidelity part of the accuracy benchmark")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS), help="benchmarks to run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per benchmark process (default 1)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default docs/results; docs/results/quick with --quick)")
    args = parser.parse_args(argv)
    args.out = resolve_out(args.out, args.quick)
    set_threads(args.threads)
    t_total = time.perf_counter()
    common = ["--out", str(args.out), "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    wall: dict[str, float] = {}
    failed: list[str] = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

    def run_module(name: str, extra: Sequence[str] = ()) -> None:
        """Each benchmark in its own process: compiled graphs, Dynamo caches and RSS never mix."""
        start = time.perf_counter()
        cmd = [sys.executable, "-m", f"benchmarks.{name}", *common, *extra]
        print(f"\n>>> {' '.join(cmd[1:])}", flush=True)
        rc = subprocess.call(cmd, cwd=ROOT, env=env)
        wall[name] = time.perf_counter() - start
        print(f"<<< {name}: exit {rc}, {wall[name]:.0f} s", flush=True)
        if rc != 0:
            failed.append(f"{name} (exit {rc})")

    # Phase 1: accuracy (Llama part, then memory) beside the MiniLM part: neither measures time.
    minilm = None
    if "accuracy" in args.only and not args.skip_minilm:
        cmd = [sys.executable, "-m", "benchmarks.accuracy", *common, "--part", "minilm"]
        print(f"\n>>> {' '.join(cmd[1:])} (in the background)", flush=True)
        minilm_log = open(args.out / ".accuracy_minilm.log", "w")  # noqa: SIM115 - closed below
        minilm = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=minilm_log, stderr=subprocess.STDOUT),
                  time.perf_counter(), minilm_log)
    if "accuracy" in args.only:
        run_module("accuracy", ["--part", "llama"])
    if "kv_accuracy" in args.only:
        run_module("kv_accuracy")
    if "smollm2" in args.only:
        run_module("smollm2")
    if "memory" in args.only:
        run_module("memory")
    if minilm is not None:
        proc, start, log_file = minilm
        rc = proc.wait()
        log_file.close()
        wall["accuracy_minilm"] = time.perf_counter() - start
        print(f"<<< accuracy --part minilm: exit {rc}, {wall['accuracy_minilm']:.0f} s "
              f"(log: {args.out / '.accuracy_minilm.log'})", flush=True)
        if rc != 0:
            failed.append(f"accuracy_minilm (exit {rc})")
        else:
            (args.out / ".accuracy_minilm.log").unlink(missing_ok=True)
    # Phase 2: the timed benchmarks, one at a time.
    for name in ("speed", "kv_speed", "compile_cost"):
        if name in args.only:
            run_module(name)

    summary = {
        "machine": machine_info(),
        "command": command_line("benchmarks.run", argv),
        "wall_s": wall,
        "total_wall_s": time.perf_counter() - t_total,
        "failed": failed,
    }
    if not args.quick and set(args.only) == set(BENCHMARKS):
        write_json(args.out / "run.json", summary)
    index = write_index(args.out, summary if not args.quick else {})
    names = []
    for name in args.only:
        names.append(name)
        if name == "accuracy" and not args.skip_minilm:
            names.append("accuracy_minilm")
    _print_tables(args.out, names)
    print(f"\nwall time per benchmark: {', '.join(f'{k} {v:.0f} s' for k, v in wall.items())}; "
          f"total {summary['total_wall_s']:.0f} s; index: {index}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
