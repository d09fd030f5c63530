"""The default demo: compress the real SmolLM2-135M-Instruct (weights and latent KV) and chat with it.

For a few chat prompts the dense and the compressed model's greedy answers are
shown side by side, with held-out perplexity (calibrated on one text source,
measured on another), measured weight and KV-cache bytes, compression time
and decode throughput of both.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import LowRankConfig
from .evaluation import perplexity
from .runtime.compiled_forward import compile_forward, compress_on_first_call
from .modules import weight_bytes
from .text_data import packed_token_batches, stdlib_sentences

log = logging.getLogger(__name__)

CHAT_PROMPTS = (
    "What is the capital of France?",
    "What is the largest planet in the solar system?",
    "Give me three tips for staying healthy.",
)


@dataclass(frozen=True)
class ModelRun:
    """What the demo measures of one model (dense or compressed)."""

    answers: tuple[str, ...]
    perplexity: float
    weight_bytes: int
    kv_cache_bytes: int  # for the demo's batch at prompt + max_new_tokens tokens
    decode_tokens_per_s: float


def chat_batch(tokenizer: Any, prompts: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The prompts as chat turns, left-padded into one batch for generation."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts]
    tokenizer.padding_side = "left"
    return dict(tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))


def _answers(tokenizer: Any, batch: dict[str, torch.Tensor], output: torch.Tensor) -> tuple[str, ...]:
    new = output[:, batch["input_ids"].shape[1]:]
    return tuple(" ".join(tokenizer.decode(row, skip_special_tokens=True).split()) for row in new)


def _timed_generate(generate: Any, batch: dict[str, torch.Tensor], max_new_tokens: int) -> tuple[torch.Tensor, float]:
    """Greedy generation and its decode throughput (new tokens of the whole batch per second, prefill included)."""
    start = time.perf_counter()
    with torch.no_grad():
        output = generate(batch, max_new_tokens)
    seconds = time.perf_counter() - start
    return output, batch["input_ids"].shape[0] * (output.shape[1] - batch["input_ids"].shape[1]) / seconds


def run_chat_demo(model: nn.Module, tokenizer: Any, options: LowRankConfig, *, calib_batches: int, heldout_batches: int,
                  batch_size: int, seq_len: int, max_new_tokens: int) -> tuple[ModelRun, ModelRun, float]:
    """``(dense, compressed, compression seconds)`` for ``model`` compressed with ``options`` (calibration is
    taken from stdlib docstrings here; ``options.calibration`` is ignored)."""
    from .runtime.generation import generate  # loads the latent-attention kernels
    from .runtime.latent_cache import LatentKVCache

    calibration = packed_token_batches(tokenizer, stdlib_sentences("calibration", 40 * calib_batches * batch_size),
                                       batch_size, seq_len, calib_batches)
    heldout = [b["input_ids"] for b in packed_token_batches(
        tokenizer, stdlib_sentences("heldout", 40 * heldout_batches * batch_size), batch_size, seq_len, heldout_batches)]
    options = LowRankConfig(**{**options.to_json(), "calibration": calibration})
    batch = chat_batch(tokenizer, CHAT_PROMPTS)

    def dense_generate(b: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        return model.generate(**b, max_new_tokens=n, do_sample=False)

    capacity = batch["input_ids"].shape[1] + max_new_tokens
    _timed_generate(dense_generate, batch, 2)  # warmed up as the compressed model is below: both timed alike
    dense_out, dense_speed = _timed_generate(dense_generate, batch, max_new_tokens)
    dense_ppl = perplexity(lambda ids: model(ids, use_cache=False), heldout)
    dense_weights = weight_bytes(model)
    log.info("dense: perplexity %.2f, %.1f tokens/s", dense_ppl, dense_speed)

    start = time.perf_counter()
    compile_forward(model, options)
    compress_on_first_call(model, options)
    seconds = time.perf_counter() - start
    cache = LatentKVCache(model, batch["input_ids"].shape[0], capacity)

    def compressed_generate(b: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        return generate(model, b["input_ids"], b["attention_mask"], options=options, max_new_tokens=n, cache=cache,
                        do_sample=False)

    _timed_generate(compressed_generate, batch, 2)  # compiles the prefill and decode graphs
    out, speed = _timed_generate(compressed_generate, batch, max_new_tokens)
    dense = ModelRun(_answers(tokenizer, batch, dense_out), dense_ppl, dense_weights, cache.dense_bytes(), dense_speed)
    compressed = ModelRun(_answers(tokenizer, batch, out), perplexity(lambda ids: model(ids, use_cache=False), heldout),
                          weight_bytes(model), cache.latent_bytes, speed)
    return dense, compressed, seconds
