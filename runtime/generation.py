"""`generate`: compress a causal LM once, then generate through transformers with a latent KV cache."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lrcompile.config import LowRankConfig
from lrcompile.errors import LatentCacheError, LowRankConfigError
from lrcompile.modules import AQLinear, AQLowRankLinear, LowRankLinear

from .compiled_forward import compile_forward, compress_on_first_call, has_latent_attention
from .latent_cache import LatentKVCache

log = logging.getLogger(__name__)


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    options: LowRankConfig | Mapping[str, Any] | None = None,
    max_new_tokens: int = 32,
    cache: LatentKVCache | None = None,
    **generate_kwargs: Any,
) -> Any:
    """Generate ``max_new_tokens`` after ``input_ids`` (left-padded, with ``attention_mask``) with a latent KV cache.

    The first call compresses the model (``options`` must set ``kv_ratio``): its
    forward is compiled with the ``lowrank`` backend and run once on the first
    calibration batch (or the prompt when no calibration is given). Later calls
    reuse the compressed model and the compiled graphs. ``cache`` is reset and
    reused when given, else one sized for this request is built. Other keyword
    arguments go to ``model.generate`` (``do_sample``, ``temperature``, ...).

    Without ``options`` (a model compressed already, e.g. loaded from a folder)
    the graphs are compiled with Inductor on CUDA and with ``eager`` elsewhere:
    on CPU Inductor's compiles of the prefill and decode graphs, again for each
    new prompt shape, cost far more than the few tokens they speed up (as the
    CLI's ``--compiler eager`` default). Pass options to choose.
    """
    if options is None:
        on_cuda = any(p.device.type == "cuda" for p in model.parameters())
        options = LowRankConfig(compiler="inductor" if on_cuda else "eager")
    config = LowRankConfig.from_options(options)
    if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.is_complex():
        what = f"a tensor of dtype {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise LowRankConfigError(f"generate: input_ids is {what}; token ids are an integer tensor (torch.long)")
    compressed = has_latent_attention(model)
    factored = next((name for name, m in model.named_modules()
                     if isinstance(m, (LowRankLinear, AQLinear, AQLowRankLinear))), None)
    if not compressed and factored is not None:
        raise LatentCacheError(
            f"{type(model).__name__} has compressed weights ({factored}, ...) but no latent KV cache: generate with "
            "model.generate(...) (transformers' own cache); a latent cache is planned with the weights, so compress "
            "a fresh copy of the model with a kv_ratio for one")
    if not compressed and config.kv_ratio is None:
        raise LowRankConfigError("generate needs option 'kv_ratio' to restructure attention for a latent KV cache")
    compile_forward(model, config)
    if not compressed:
        compress_on_first_call(model, config, {"input_ids": input_ids, "attention_mask": attention_mask})
        if not has_latent_attention(model):
            raise LatentCacheError(
                f"{type(model).__name__}: no attention block was restructured for a latent KV cache (kv_unmatched="
                f"'warn' left them all dense: reasons in lrcompile.model_report(model)); its weights are compressed "
                "now: generate with model.generate(...)")
    needed = input_ids.shape[1] + max_new_tokens
    if cache is None:  # generate runs max(num_beams, num_return_sequences) rows per prompt
        rows = max(generate_kwargs.get("num_beams", 1) or 1, generate_kwargs.get("num_return_sequences", 1) or 1)
        cache = LatentKVCache(model, input_ids.shape[0] * rows, needed)
    else:
        cache.reset()
    if needed > cache.max_cache_len:
        raise LatentCacheError(
            f"prompt of {input_ids.shape[1]} tokens + {max_new_tokens} new tokens exceed the cache's capacity of "
            f"{cache.max_cache_len}; build the LatentKVCache with max_cache_len >= {needed}"
        )
    # transformers 5.24 renamed the forward's past_key_values to cache (the old name warns): use the model's name
    cache_name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    return model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                          **{cache_name: cache}, **generate_kwargs)
