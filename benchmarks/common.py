"""Helpers shared by the benchmarks: machine description, Markdown/JSON output, timing, compile instrumentation."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "results"
ANALYSIS_MARKER = "<!-- analysis -->"

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
        f"{m.get('torch_threads', '?')} torch thread(s), {cuda}"
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


def compression_record(model: Any, bytes_before: int, recorder: CompileRecorder,
                       layer_fields: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """Totals, measured weight bytes, pass timings and per-layer outcome of a model compressed under ``recorder``.

    ``layer_fields(name)`` adds benchmark-specific keys (layer kind, block index) to each layer's entry.
    """
    import lrcompile

    report = lrcompile.model_report(model)
    totals = report.totals()
    return {
        "param_ratio_achieved": totals["param_ratio"],
        "params_before": totals["params_before"],
        "params_after": totals["params_after"],
        "linears": totals["linears"],
        "factored": totals["factored"],
        "linear_weight_bytes_before": totals["weight_bytes_before"],
        "linear_weight_bytes_after": totals["weight_bytes_after"],
        "model_weight_bytes_before": bytes_before,
        "model_weight_bytes_after": lrcompile.weight_bytes(model),
        "pass_timings_s": {k[5:-2]: round(v, 3) for k, v in recorder.totals().items() if k.startswith("pass_")},
        "graphs_compressed": len(recorder.graphs),
        "layers": [
            {"name": l.name, **layer_fields(l.name), "shape": [l.out_features, l.in_features], "status": l.status,
             "rank": l.rank, "params_after": l.params_after, "sensitivity_kl": l.sensitivity,
             "truncation_loss": l.truncation_loss}
            for l in report.layers
        ],
    }


def save_figure(fig: Any, path: Path) -> bool:
    """Lay out, write (PNG, 120 dpi) and close a matplotlib figure; True, for the plot functions to return."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def resolve_out(out: Path | None, quick: bool) -> Path:
    """The output folder: ``--out``, else docs/results (docs/results/quick for ``--quick``, so a smoke run
    never overwrites the full results)."""
    path = out or (DEFAULT_OUT / "quick" if quick else DEFAULT_OUT)
    path.mkdir(parents=True, exist_ok=True)
    return path


def decode_step_times(model: Any, cache: Any, prompt: Any, tokens: int) -> list[float]:
    """Prefill ``prompt`` into ``cache``, then time ``tokens`` greedy decode steps one by one."""
    cache.reset()
    out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(tokens):
        start = time.perf_counter()
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - start)
    return times


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


def run_child(module: str, child_args: Sequence[str], env: dict[str, str], what: str) -> dict[str, Any]:
    """Run ``python -m module *child_args --result FILE`` (one measurement in a fresh process) and return the
    JSON it wrote there; a failed child exits the benchmark naming ``what``, with the child's output tails."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = Path(f.name)
    try:
        proc = subprocess.run([sys.executable, "-m", module, *child_args, "--result", str(result_path)], cwd=ROOT,
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
            raise SystemExit(f"{module}: {what} failed (exit {proc.returncode})")
        return json.loads(result_path.read_text())
    finally:
        result_path.unlink(missing_ok=True)


class PeakRSS:
    """The process's peak resident memory from entry (or :meth:`mark_floor`) on, sampled every 10 ms by a thread."""

    def __enter__(self) -> PeakRSS:
        import psutil

        self.process = psutil.Process()
        self.mark_floor()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def mark_floor(self) -> None:
        """Measure from here: ``floor`` is the resident memory now, ``peak`` restarts from it."""
        self.floor = self.peak = self.process.memory_info().rss

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
