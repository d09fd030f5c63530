"""`LatentKVCache`: a transformers ``Cache`` that holds only the latent K/V of restructured attention.

Per layer it owns, preallocated for ``max_cache_len`` tokens:

* ``k_latent`` ``[B, max_cache_len, groups * k_rank]`` and ``v_latent``
  ``[B, max_cache_len, groups * v_rank]`` in the model's dtype,
* ``length``, the number of filled slots (a tensor, so it changes without recompiling),

and, shared by all layers, ``positions`` ``[B, max_cache_len]``: the RoPE
position of each cached token (K is cached before RoPE, and under left padding
positions differ from slots). Every layer writes the same positions.

While Dynamo traces the model, ``update`` records the marker op
``lowrank::latent_cache_marker`` with these buffers; the backend's attention
restructure replaces it with ``lowrank::write_latent_cache`` and
``lowrank::latent_attention`` over the buffers. The masks transformers builds
are sized for ``max_cache_len`` slots, as for its ``StaticCache``.

Outside compilation it behaves as a dense static cache (allocated on first use),
so eager code on the same cache object stays correct.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from lrcompile.errors import LatentCacheError
from lrcompile.kernels.latent_cache import check_capacity, latent_cache_marker
from lrcompile.types import LatentAttention

from .compressed_layers import recorded_latent

log = logging.getLogger(__name__)


class LatentLayer(CacheLayerMixin):
    """One attention layer's latent buffers."""

    is_compileable = True
    is_sliding = False

    def __init__(self, layer: LatentAttention, batch_size: int, max_cache_len: int, positions: torch.Tensor):
        super().__init__()
        device = positions.device
        self.spec = layer
        self.max_cache_len = max_cache_len
        self.batch_size = batch_size
        groups = layer.groups
        self.k_latent = torch.zeros(batch_size, max_cache_len, groups * layer.k_rank, dtype=layer.dtype, device=device)
        self.v_latent = torch.zeros(batch_size, max_cache_len, groups * layer.v_rank, dtype=layer.dtype, device=device)
        self.positions = positions
        self.length = torch.zeros((), dtype=torch.long, device=device)
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        shape = (self.batch_size, key_states.shape[1], self.max_cache_len)
        self.keys = key_states.new_zeros(*shape, key_states.shape[-1])
        self.values = value_states.new_zeros(*shape, value_states.shape[-1])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if torch.compiler.is_compiling():
            return latent_cache_marker(key_states, value_states, self.k_latent, self.v_latent, self.positions, self.length)
        if key_states.shape[0] != self.batch_size:
            raise LatentCacheError(f"latent KV cache built for batch {self.batch_size}, called with batch {key_states.shape[0]}")
        if self.keys is None:
            self.lazy_initialization(key_states, value_states)
        start, new = int(self.length), key_states.shape[-2]
        check_capacity(start, new, self.max_cache_len)
        self.keys[:, :, start : start + new] = key_states
        self.values[:, :, start : start + new] = value_states
        self.length += new
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        self.length.zero_()
        self.positions.zero_()
        self.keys = self.values = None

    def buffers(self) -> tuple[torch.Tensor, ...]:
        return self.k_latent, self.v_latent, self.positions, self.length


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """HF attention modules in layer order: those with a ``k_proj`` linear and a ``layer_idx``."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(getattr(m, "k_proj", None), nn.Linear)
             and hasattr(m, "layer_idx")]
    return sorted(found, key=lambda item: item[1].layer_idx)


class LatentKVCache(Cache):
    """Latent K/V for every restructured attention layer of ``model``, for ``batch_size`` sequences of
    up to ``max_cache_len`` tokens (prompt, padding included, plus generated tokens).

    The model must have been compressed with a ``kv_ratio`` in this process (or
    loaded with :func:`lrcompile.load_compressed`): the ranks come from its record.
    Reuse across requests: :meth:`reset`.
    """

    def __init__(self, model: nn.Module, batch_size: int, max_cache_len: int):
        if batch_size < 1 or max_cache_len < 1:
            raise LatentCacheError(f"batch_size={batch_size} and max_cache_len={max_cache_len} must be positive")
        layers = []
        positions = None
        for name, module in _attention_modules(model):
            spec = recorded_latent(module.k_proj.weight)
            if spec is None:
                raise LatentCacheError(
                    f"{name} has no latent-KV plan: compress the model with a kv_ratio (call the compiled model once, "
                    "or lrcompile.generate does it) before building a LatentKVCache"
                )
            if positions is None:
                positions = torch.zeros(batch_size, max_cache_len, dtype=torch.long, device=module.k_proj.weight.device)
            layers.append(LatentLayer(spec, batch_size, max_cache_len, positions))
        if not layers:
            raise LatentCacheError(f"{type(model).__name__} has no attention module with a k_proj linear and a layer_idx")
        super().__init__(layers=layers)
        self.max_cache_len = max_cache_len
        log.info("latent KV cache: %d layers, batch %d, %d slots, %d bytes (a dense cache: %d)", len(layers),
                 batch_size, max_cache_len, self.latent_bytes, self.dense_bytes())

    @property
    def latent_bytes(self) -> int:
        """Bytes allocated for every layer's latents and fill level, and the shared positions."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for layer in self.layers
                    for t in layer.buffers()}
        return sum(storages.values())

    def dense_bytes(self) -> int:
        """Bytes a dense cache of the same capacity would hold: ``2 * kv_heads * head_dim`` per token and layer."""
        return sum(layer.batch_size * self.max_cache_len * layer.spec.dense_width * layer.spec.itemsize
                   for layer in self.layers)
