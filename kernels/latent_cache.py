"""Custom ops that connect the runtime's latent KV cache to the captured graph.

* ``lowrank::latent_cache_marker`` is what the cache's ``update`` records while
  Dynamo traces: it takes the layer's dense K/V and the layer's latent buffers
  (so they become graph inputs) and stands for the dense K/V of the whole
  cache. The attention-restructure pass replaces it; it never runs.
* ``lowrank::write_latent_cache`` writes a chunk's latents and key positions
  into the buffers at the layer's fill level and advances it. It is declared as
  mutating them, so the buffers are updated in place by compiled graphs. Its
  fake implementation checks the chunk's batch against the cache's, so a
  mis-sized cache fails when the graph is compiled, before anything is written.

The write never reads the fill level on the host: the slots are ``length +
arange(T)`` on the buffers' device and the capacity check is
``torch._assert_async``, so a decode step needs no device-to-host copy and can
be captured in a CUDA graph. On CPU the check raises at once (reported as
:class:`LatentCacheError`); on CUDA it is a device-side assertion, which stops
the process at the next synchronisation. ``lrcompile.generate`` checks the
prompt and new-token counts against the capacity on the host before it starts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lrcompile.errors import LatentCacheError


@torch.library.custom_op("lowrank::latent_cache_marker", mutates_args=())
def latent_cache_marker(
    key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, pos_cache: Tensor, length: Tensor
) -> tuple[Tensor, Tensor]:
    """Dense K/V ``[B, Hk, S_max, D]`` of the whole cache; only ever traced, never run."""
    raise LatentCacheError(
        "a latent KV cache was used by a graph whose attention was not restructured: compile the model with "
        "backend='lowrank' and a kv_ratio (see the report for the layers left dense)"
    )


@latent_cache_marker.register_fake
def _(key, value, k_cache, v_cache, pos_cache, length):
    shape = (key.shape[0], key.shape[1], k_cache.shape[1], key.shape[3])
    return key.new_empty(shape), value.new_empty((*shape[:3], value.shape[3]))


def _overflow(length: int, new: int, capacity: int) -> LatentCacheError:
    return LatentCacheError(
        f"latent KV cache overflow: {length} cached + {new} new tokens exceed its capacity of {capacity} "
        "tokens; create the cache with a larger max_cache_len"
    )


def check_rows(cache_rows: int, new_rows: int) -> None:
    if new_rows != cache_rows:
        raise LatentCacheError(
            f"latent KV cache built for batch {int(cache_rows)}, called with batch {int(new_rows)}; generate runs num_beams (or "
            "num_return_sequences) rows per prompt: build the LatentKVCache with batch_size = prompts * "
            "max(num_beams, num_return_sequences)"
        )


@torch.library.custom_op("lowrank::write_latent_cache", mutates_args=("k_cache", "v_cache", "pos_cache", "length"))
def write_latent_cache(
    k_cache: Tensor, v_cache: Tensor, pos_cache: Tensor, length: Tensor, k_new: Tensor, v_new: Tensor, positions: Tensor
) -> None:
    """``cache[:, length:length+T] = new``; ``length += T``. Buffers ``[B, S_max, R]``, positions ``[B, S_max]``."""
    check_rows(k_cache.shape[0], k_new.shape[0])
    new, capacity = k_new.shape[1], k_cache.shape[1]
    try:  # CPU raises here; CUDA asserts on the device, without waiting for it
        torch._assert_async(length + new <= capacity, "latent KV cache overflow: create it with a larger max_cache_len")
    except RuntimeError as error:
        raise _overflow(int(length), new, capacity) from error
    slots = length + torch.arange(new, device=length.device)
    k_cache.index_copy_(1, slots, k_new.to(k_cache.dtype))
    v_cache.index_copy_(1, slots, v_new.to(v_cache.dtype))
    pos_cache.index_copy_(1, slots, positions.to(pos_cache.dtype).expand(pos_cache.shape[0], new))
    length.add_(new)


@write_latent_cache.register_fake
def _(k_cache, v_cache, pos_cache, length, k_new, v_new, positions):
    check_rows(k_cache.shape[0], k_new.shape[0])
