"""Run every lrcompile benchmark and index the results.

``python -m benchmarks.run`` runs, on this machine:

1. **accuracy** (:mod:`benchmarks.accuracy`): held-out perplexity of the trained
   ``small`` Llama fixture for ``svd`` / ``asvd`` / ``whiten`` x ``uniform`` /
   ``sensitivity`` / ``closed_form`` at param ratios 1.0 (once per method),
   0.95, 0.9, 0.85, 0.8; and the MiniLM embedding fidelity at the same ratios
   (functions of :mod:`benchmarks.minilm_fidelity`), in a parallel subprocess;
2. **memory** (:mod:`benchmarks.memory`): measured weight and KV-cache bytes and
   peak RSS, one subprocess per configuration;
3. **speed** (:mod:`benchmarks.speed`): prefill and decode throughput of the
   compressed model compiled with ``lowrank`` + Inductor against the same model
   compiled with Inductor alone, batch 1 and 8;
4. **compile cost** (:mod:`benchmarks.compile_cost`): wall time per phase
   (Dynamo capture, statistics, sensitivity, factoring, Inductor) on the
   ``tiny`` / ``small`` / ``medium`` fixtures.

Accuracy (both parts) and memory do not measure time, so they run first and
side by side; speed and compile cost then run alone. Each writes
``docs/results/<name>.{json,md,png}``; this script prints their Markdown
tables and writes ``docs/results/README.md``, an index of every result file.

Options: ``--quick`` (a smoke run of every benchmark, ~5 min), ``--skip-minilm``,
``--only accuracy speed ...``, ``--out DIR``. Every sub-benchmark also runs
alone: ``python -m benchmarks.accuracy`` etc.

The first half of this module holds helpers shared by the sub-benchmarks
(machine description, Markdown/JSON output, timing, compile instrumentation).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "results"
ANALYSIS_MARKER = "<!-- analysis -->"

# --------------------------------------------------------------------------- shared helpers


def machine_info() -> dict[str, Any]:
    """Where and with what a result was measured."""
    import torch

    try:
        import transformers

        tf_version = transformers.__version__
    except Exception:  # noqa: BLE001
        tf_version = None
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": tf_version,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def machine_line(m: dict[str, Any]) -> str:
    cuda = "CUDA available" if m.get("cuda") else "no CUDA (CPU only)"
    return (
        f"{m['platform']}, {m.get('cpu') or '?'}, {m['cpu_count']} cores (shared with other jobs), "
        f"torch {m['torch']}, transformers {m.get('transformers')}, python {m['python']}, "
        f"{m['torch_threads']} torch thread(s), {cuda}"
    )


def command_line(prog: str, argv: Sequence[str] | None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join([f"python -m {prog}", *args])


def set_threads(threads: int) -> None:
    """Intra-op threads for torch (and OpenMP in Inductor's kernels).

    One thread by default: on this shared 2-core machine two threads fighting
    other jobs' processes make every timing (and training) several times slower
    and far noisier.
    """
    import torch

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def kept_analysis(path: Path) -> str:
    """Hand-written text after :data:`ANALYSIS_MARKER` in an existing Markdown file (kept on re-runs)."""
    if path.exists():
        old = path.read_text(encoding="utf-8")
        if ANALYSIS_MARKER in old:
            return old.split(ANALYSIS_MARKER, 1)[1].strip()
    return ""


def write_markdown(path: Path, title: str, payload: dict[str, Any], body: Sequence[str]) -> None:
    """``# title``, a header (date, machine, command, wall time), ``body``, then the kept analysis."""
    m = payload["machine"]
    lines = [
        f"# {title}",
        "",
        f"- date: {m['date']}",
        f"- machine: {machine_line(m)}",
        f"- command: `{payload['command']}`",
        f"- wall time: {payload.get('total_wall_s', 0):.0f} s",
        "",
        *body,
        "",
        ANALYSIS_MARKER,
        "",
        kept_analysis(path) or "_No hand-written analysis yet._",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` with the Agg backend, or None (plots are skipped) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as err:  # noqa: BLE001 - any import failure means no plot
        print(f"matplotlib unavailable ({err}); plots skipped", file=sys.stderr)
        return None
    return plt


def resolve_out(out: Path | None, quick: bool) -> Path:
    """The output folder: ``--out``, else docs/results (docs/results/quick for ``--quick``, so a smoke run
    never overwrites the full results)."""
    path = out or (DEFAULT_OUT / "quick" if quick else DEFAULT_OUT)
    path.mkdir(parents=True, exist_ok=True)
    return path


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(head: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A Markdown table; ``align`` is one char per column (``l`` or ``r``), default: first left, rest right."""
    align = align or "l" + "r" * (len(head) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    out = ["| " + " | ".join(map(str, head)) + " |", "|" + "|".join(sep) + "|"]
    out += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(out)


class CompileRecorder:
    """Records what the ``lowrank`` backend does, per captured graph.

    Wraps ``lrcompile.backend.compress_graph`` and ``compile_downstream`` (the
    backend looks both up in its module at call time), so each graph gives the
    :class:`~lrcompile.pipeline.GraphCompression` (with per-pass ``timings``),
    the wall time of the whole compression and that of the downstream compile
    (Inductor). ``dense_backend()`` gives an Inductor backend timed the same
    way, for the dense baseline.
    """

    def __init__(self) -> None:
        self.graphs: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def active(self) -> Iterator[CompileRecorder]:
        import lrcompile.backend as backend

        compress, downstream = backend.compress_graph, backend.compile_downstream

        def timed_compress(gm: Any, example_inputs: Any, config: Any) -> Any:
            start = time.perf_counter()
            compression = compress(gm, example_inputs, config)
            self.graphs.append({"compression": compression, "compress_s": time.perf_counter() - start,
                                "downstream_s": 0.0, "timings": dict(compression.timings)})
            return compression

        def timed_downstream(compression: Any, compiler: str) -> Any:
            start = time.perf_counter()
            compiled = downstream(compression, compiler)
            if self.graphs and self.graphs[-1]["compression"] is compression:
                self.graphs[-1]["downstream_s"] = time.perf_counter() - start
            return compiled

        backend.compress_graph, backend.compile_downstream = timed_compress, timed_downstream
        try:
            yield self
        finally:
            backend.compress_graph, backend.compile_downstream = compress, downstream

    def dense_backend(self) -> Callable[..., Any]:
        """Inductor (``compile_fx``) as a Dynamo backend that records its own wall time."""

        def inductor(gm: Any, example_inputs: Any) -> Any:
            from torch._inductor.compile_fx import compile_fx

            start = time.perf_counter()
            compiled = compile_fx(gm, example_inputs)
            self.graphs.append({"compression": None, "compress_s": 0.0, "downstream_s": time.perf_counter() - start,
                                "timings": {}})
            return compiled

        return inductor

    def totals(self, start: int = 0) -> dict[str, float]:
        """Sums over graphs ``start:``: backend compression, downstream compile and per-pass seconds."""
        out: dict[str, float] = {"compress_s": 0.0, "downstream_s": 0.0}
        for g in self.graphs[start:]:
            out["compress_s"] += g["compress_s"]
            out["downstream_s"] += g["downstream_s"]
            for k, v in g["timings"].items():
                out[f"pass_{k}_s"] = out.get(f"pass_{k}_s", 0.0) + v
        return out


# --------------------------------------------------------------------------- the runner

BENCHMARKS = ("accuracy", "memory", "speed", "compile_cost")

RESULT_FILES = (
    ("accuracy.md", "Perplexity of the trained `small` Llama fixture per method, allocation and param ratio"),
    ("accuracy_minilm.md", "MiniLM (all-MiniLM-L6-v2) embedding fidelity at ratios 0.95 / 0.9 / 0.85 / 0.8"),
    ("speed.md", "Prefill and decode throughput, `lowrank` + Inductor vs dense Inductor, batch 1 and 8"),
    ("memory.md", "Measured weight bytes, KV-cache bytes and peak RSS, compressed vs dense"),
    ("compile_cost.md", "Compile time per phase and its growth over the tiny / small / medium fixtures"),
    ("minilm_fidelity.md", "MiniLM embedding fidelity at ratios 0.9 / 0.8 with per-layer ranks (standalone benchmark)"),
    ("fixtures.md", "The trained Llama fixtures (recipes, training, held-out perplexity)"),
)


def write_index(out: Path, summary: dict[str, Any]) -> Path:
    """``docs/results/README.md``: every result file with what it holds, plus the last run's summary."""
    lines = [
        "# Benchmark results",
        "",
        "All numbers are measured on the machine named in each file (CPU only here: no CUDA). "
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
    for name in ("speed", "compile_cost"):
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
