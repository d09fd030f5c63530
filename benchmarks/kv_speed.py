"""Decode speed with a latent KV cache vs a dense static cache, both compiled with Inductor, on this machine.

The trained ``small`` fixture decodes one token per sequence after a prompt
of ``P`` tokens, into a cache of ``P + N`` slots:

* ``dense``: transformers' ``StaticCache`` (K/V of every slot), ``model.forward``
  compiled with Inductor;
* ``latent``: ``lrcompile.LatentKVCache`` at ``kv_ratio`` (attention only,
  ``param_ratio=1.0``), ``model.forward`` compiled with ``backend="lowrank"``
  and Inductor downstream. Without CUDA, ``lowrank::latent_attention`` runs as
  its reference decomposition compiled by Inductor: K is rebuilt from the
  latent for every slot at every step; the fused Triton kernel is CUDA only.

Each decode step is timed; medians over the ``N`` steps of a run, runs
interleaved, ratio = latent tokens/s over dense tokens/s.

    python -m benchmarks.kv_speed            # small fixture, batch 1 and 8, ~4 min
    python -m benchmarks.kv_speed --quick    # tiny fixture, batch 1

Writes ``docs/results/kv_speed.{json,md}``.
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

from benchmarks.common import (
    command_line,
    decode_step_times,
    fmt,
    machine_info,
    median,
    resolve_out,
    set_threads,
    table,
    write_json,
    write_markdown,
)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import StaticCache

    import lrcompile
    from benchmarks.fixtures import calibration_chunks, heldout_chunks, load_fixture

    torch._dynamo.config.recompile_limit = 64  # both models' graphs count against LlamaForCausalLM.forward
    fixture = load_fixture(args.fixture)
    calibration = calibration_chunks(fixture, args.prompt, 2, 4)
    dense_model, latent_model = fixture.load_model(), fixture.load_model()
    dense_model.forward = torch.compile(dense_model.forward, backend="inductor", dynamic=False)
    config = lrcompile.LowRankConfig(calibration=calibration, param_ratio=1.0, kv_ratio=args.kv_ratio,
                                     kv_allocation="uniform", method="asvd", compiler="inductor")
    latent_model.forward = torch.compile(latent_model.forward, backend="lowrank", options=config, dynamic=False)
    results = []
    with torch.no_grad():
        latent_model(input_ids=calibration[0], use_cache=False)  # compress
        for batch in args.batches:
            prompt = heldout_chunks(fixture, args.prompt, 1, batch)[0]
            slots = args.prompt + args.tokens + 1
            caches = {"dense": (dense_model, StaticCache(config=dense_model.config, max_cache_len=slots)),
                      "latent": (latent_model, lrcompile.LatentKVCache(latent_model, batch, slots))}
            for model, cache in caches.values():  # compile prefill and decode graphs
                decode_step_times(model, cache, prompt, 2)
            samples: dict[str, list[float]] = {"dense": [], "latent": []}
            for _ in range(args.repeats):
                for kind, (model, cache) in caches.items():
                    samples[kind].append(median(decode_step_times(model, cache, prompt, args.tokens)))
            dense_kv = sum(layer.keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes()
                           for layer in caches["dense"][1].layers)
            row = {"batch": batch, "slots": slots, "dense_s": median(samples["dense"]),
                   "latent_s": median(samples["latent"]), "dense_kv_bytes": dense_kv,
                   "latent_kv_bytes": caches["latent"][1].latent_bytes}
            row["speedup"] = row["dense_s"] / row["latent_s"]
            results.append(row)
            print(f"batch {batch}: dense {row['dense_s'] * 1e3:.3f} ms/token step, latent {row['latent_s'] * 1e3:.3f} ms "
                  f"(x{row['speedup']:.3f}); KV bytes {dense_kv:,} -> {row['latent_kv_bytes']:,}", flush=True)
    return {"settings": {"fixture": args.fixture, "prompt": args.prompt, "tokens": args.tokens, "kv_ratio": args.kv_ratio,
                         "repeats": args.repeats, "batches": args.batches}, "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kv_speed", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny fixture, batch 1, fewer steps")
    parser.add_argument("--kv-ratio", type=float, default=0.5)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=32, help="decode steps timed per run (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.fixture, args.batches = ("tiny", [1]) if args.quick else ("small", [1, 8])
    if args.quick:
        args.tokens, args.repeats = 8, 2
    logging.getLogger("lrcompile").setLevel(logging.WARNING)
    set_threads(args.threads)
    out = resolve_out(args.out, args.quick)
    start = time.perf_counter()
    payload = {"machine": machine_info(), "command": command_line("benchmarks.kv_speed", argv), **run(args)}
    payload["total_wall_s"] = time.perf_counter() - start
    write_json(out / "kv_speed.json", payload)
    s = payload["settings"]
    rows = [[r["batch"], r["slots"], fmt(r["dense_s"] * 1e3), fmt(r["latent_s"] * 1e3), f"**{r['speedup']:.3f}**",
             f"{r['dense_kv_bytes']:,}", f"{r['latent_kv_bytes']:,}", f"{r['latent_kv_bytes'] / r['dense_kv_bytes']:.3f}"]
            for r in payload["results"]]
    body = [
        f"- fixture `{s['fixture']}`, prompt {s['prompt']} tokens, {s['tokens']} greedy decode steps timed per run, "
        f"{s['repeats']} interleaved runs, medians; kv_ratio {s['kv_ratio']} (uniform, asvd), weights not factored",
        "- dense: `StaticCache` + Inductor; latent: `LatentKVCache` + `backend='lowrank'` + Inductor. On CPU the latent "
        "attention is the reference decomposition (K rebuilt for every slot each step); the fused kernel is CUDA only",
        "",
        table(["batch", "cache slots", "dense ms/step", "latent ms/step", "speedup (dense / latent time)",
               "dense KV bytes", "latent KV bytes", "KV ratio"], rows),
        "",
    ]
    write_markdown(out / "kv_speed.md", "Decode step time: latent KV cache vs dense static cache (Inductor)", payload, body)
    print(f"wrote {out / 'kv_speed.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
