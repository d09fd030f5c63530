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

from .compressed_layers import model_latent_attention
from .latent_cache import LatentKVCache

log = logging.getLogger(__name__)


def _as_kwargs(batch: Any) -> dict[str, Any]:
    if isinstance(batch, Mapping):
        return dict(batch)
    if isinstance(batch, (tuple, list)):
        return {"input_ids": batch[0]}
    return {"input_ids": batch}


def _has_latent_attention(model: nn.Module) -> bool:
    return next(model_latent_attention(model), None) is not None


def compile_forward(model: nn.Module, config: LowRankConfig) -> None:
    """``model.forward = torch.compile(model.forward, backend="lowrank")``, once: ``model.generate``
    then runs compiled prefill and decode graphs (a compiled *module*'s ``generate`` would run eagerly)."""
    if not hasattr(model.forward, "_torchdynamo_orig_callable"):
        model.forward = torch.compile(model.forward, backend="lowrank", options=config)


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
    """
    config = LowRankConfig.from_options(options)
    compressed = _has_latent_attention(model)
    if not compressed and config.kv_ratio is None:
        raise LowRankConfigError("generate needs option 'kv_ratio' to restructure attention for a latent KV cache")
    compile_forward(model, config)
    if not compressed:
        log.info("compressing %s on its first compiled call (kv_ratio %s)", type(model).__name__, config.kv_ratio)
        first = config.calibration[0] if config.calibration else {"input_ids": input_ids, "attention_mask": attention_mask}
        with torch.no_grad():
            model(**_as_kwargs(first), use_cache=False)
        if not _has_latent_attention(model):
            raise LatentCacheError(f"{type(model).__name__}: no attention block was restructured (see the report)")
    needed = input_ids.shape[1] + max_new_tokens
    if cache is None:
        cache = LatentKVCache(model, input_ids.shape[0], needed)
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
