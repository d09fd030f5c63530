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

Only compiled graphs can write latents (``update`` receives K after RoPE, not
the hidden states they come from), so an eager ``update`` raises
:class:`LatentCacheError` and leaves the cache as it was: a cache never holds a
fill level without the latents behind it. Nothing is raised while tracing
(Dynamo would skip the whole frame); a cache of the wrong batch fails when the
write op is compiled, see :mod:`lrcompile.kernels.latent_cache`.

What ``generate`` does to a cache works on the latents as on dense K/V: beam
search reorders the rows of every buffer, the shared positions included (in
place, so compiled graphs keep mutating the same tensors);
``batch_repeat_interleave`` / ``batch_select_indices`` repeat or select rows;
``crop`` (assisted decoding) lowers the fill level, as for ``StaticCache``, and
the next write overwrites the dropped slots. Offloading is refused: the buffers
are inputs of the compiled graphs.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from lrcompile.errors import LatentCacheError
from lrcompile.kernels.latent_cache import latent_cache_marker
from lrcompile.modules import GroupedLowRankProjection
from lrcompile.types import LatentAttention

from .compiled_forward import compiled_options, compress_on_first_call, has_latent_attention

log = logging.getLogger(__name__)


class LatentLayer(CacheLayerMixin):
    """One attention layer's latent buffers."""

    is_compileable = True
    is_croppable = True
    is_sliding = False

    def __init__(self, layer: LatentAttention, batch_size: int, max_cache_len: int, positions: torch.Tensor,
                 dtype: torch.dtype):
        """``dtype``: the latent projections' (the model's current dtype, which ``model.to`` may have changed)."""
        super().__init__()
        device = positions.device
        self.spec = layer
        self.max_cache_len = max_cache_len
        self.batch_size = batch_size
        groups = layer.groups
        self.k_latent = torch.zeros(batch_size, max_cache_len, groups * layer.k_rank, dtype=dtype, device=device)
        self.v_latent = torch.zeros(batch_size, max_cache_len, groups * layer.v_rank, dtype=dtype, device=device)
        self.positions = positions
        self.length = torch.zeros((), dtype=torch.long, device=device)
        self.is_initialized = True
        mark_static(self.buffers())

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the buffers are allocated by ``__init__``, and no dense K/V is ever held."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not torch.compiler.is_compiling():
            raise LatentCacheError(
                f"{self.spec.name} ran eagerly with a LatentKVCache, which holds latents only compiled graphs can "
                "write; call the model through its forward compiled with backend='lowrank' (lrcompile.generate does; "
                "Dynamo also runs a forward eagerly once torch._dynamo.config.recompile_limit is reached, which "
                "forwards compiled by hand share across models: torch._dynamo.reset() before compiling another), "
                "or give eager calls a transformers DynamicCache"
            )
        return latent_cache_marker(key_states, value_states, self.k_latent, self.v_latent, self.positions, self.length)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        self.length.zero_()
        self.positions.zero_()

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` tokens: the next write overwrites their slots."""
        if tokens_to_remove > 0:
            raise LatentCacheError(
                f"crop({tokens_to_remove}): pass minus the number of tokens to remove, as for transformers' StaticCache"
            )
        if tokens_to_remove == 0:
            return
        if -tokens_to_remove > int(self.length):
            raise LatentCacheError(
                f"crop({tokens_to_remove}) on {self.spec.name}, which holds {int(self.length)} tokens; remove at most that"
            )
        self.length.add_(tokens_to_remove)

    def take_rows(self, rows: torch.Tensor, positions: torch.Tensor) -> None:
        """Row ``i`` of each latent buffer becomes old row ``rows[i]``; ``positions`` is the cache's, already taken."""
        self.k_latent, self.v_latent = take_rows(self.k_latent, rows), take_rows(self.v_latent, rows)
        self.positions = positions
        self.batch_size = rows.numel()
        mark_static(self.buffers())

    def offload(self):
        raise LatentCacheError(
            f"{self.spec.name}: a LatentKVCache cannot be offloaded, its buffers are inputs of the compiled graphs on "
            f"{self.positions.device}; build it with a smaller batch_size or max_cache_len to hold less"
        )

    def buffers(self) -> tuple[torch.Tensor, ...]:
        return self.k_latent, self.v_latent, self.positions, self.length


def mark_static(buffers: tuple[torch.Tensor, ...]) -> None:
    """Mark buffers the compiled graphs mutate as static inputs (as transformers' ``StaticCache`` does): CUDA-graph
    trees (``compiler_mode="reduce-overhead"``) skip a graph that mutates any other input."""
    for tensor in buffers:
        torch._dynamo.mark_static_address(tensor)


def take_rows(tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``tensor[rows]`` along the batch dim; in place when the batch size is kept (beam reordering), so the
    buffers compiled graphs mutate stay the same tensors."""
    taken = tensor.index_select(0, rows)
    return tensor.copy_(taken) if taken.shape[0] == tensor.shape[0] else taken


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """HF attention modules in layer order: those with a ``k_proj`` (linear or restructured) and a ``layer_idx``."""
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(getattr(m, "k_proj", None), (nn.Linear, GroupedLowRankProjection)) and hasattr(m, "layer_idx")]
    return sorted(found, key=lambda item: item[1].layer_idx)


class LatentKVCache(Cache):
    """Latent K/V for every restructured attention layer of ``model``, for ``batch_size`` sequences of
    up to ``max_cache_len`` tokens (prompt, padding included, plus generated tokens).

    The ranks come from the model's latent-KV record: compressed with a ``kv_ratio``
    in this process, or loaded with ``from_pretrained`` (its ``GroupedLowRankProjection`` modules). A model whose
    forward is compiled with ``backend="lowrank"`` and a ``kv_ratio`` but not yet
    compressed is compressed here first (one compiled call on the first calibration
    batch), so ``model.generate(..., cache=LatentKVCache(model, ...))``
    needs no other step. Reuse across requests: :meth:`reset`.
    """

    def __init__(self, model: nn.Module, batch_size: int, max_cache_len: int):
        if batch_size < 1 or max_cache_len < 1:
            raise LatentCacheError(f"batch_size={batch_size} and max_cache_len={max_cache_len} must be positive")
        config = None if has_latent_attention(model) else compiled_options(model)
        if config is not None and config.kv_ratio is not None:
            compress_on_first_call(model, config)
        layers = []
        positions = None
        for name, module in _attention_modules(model):
            spec = module.k_proj.lowrank_record if isinstance(module.k_proj, GroupedLowRankProjection) else None
            if spec is None:
                raise LatentCacheError(
                    f"{name} has no latent-KV plan: compile the model's forward with backend='lowrank' and a kv_ratio "
                    "option (model.forward = torch.compile(model.forward, backend='lowrank', options=...)), or load "
                    "a compressed folder, before building a LatentKVCache"
                )
            if positions is None:
                positions = torch.zeros(batch_size, max_cache_len, dtype=torch.long, device=module.k_proj.down.device)
            layers.append(LatentLayer(spec, batch_size, max_cache_len, positions, module.k_proj.down.dtype))
        if not layers:
            raise LatentCacheError(f"{type(model).__name__} has no attention module with a k_proj linear and a layer_idx")
        super().__init__(layers=layers)
        self.max_cache_len = max_cache_len
        log.info("latent KV cache: %d layers, batch %d, %d slots, %d bytes (a dense cache: %d)", len(layers),
                 batch_size, max_cache_len, self.latent_bytes, self.dense_bytes())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` becomes old row ``beam_idx[i]`` in every layer and in the shared positions."""
        self._take_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._take_rows(self._rows().repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._take_rows(self._rows()[indices])

    def _rows(self) -> torch.Tensor:
        return torch.arange(self.batch_size, device=self.layers[0].positions.device)

    def _take_rows(self, rows: torch.Tensor) -> None:
        positions = self.layers[0].positions
        rows = rows.to(positions.device)
        positions = take_rows(positions, rows)
        for layer in self.layers:
            layer.take_rows(rows, positions)

    @property
    def latent_bytes(self) -> int:
        """Bytes allocated for every layer's latents and fill level, and the shared positions."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for layer in self.layers
                    for t in layer.buffers()}
        return sum(storages.values())

    def dense_bytes(self) -> int:
        """Bytes a dense cache of the same capacity would hold: ``2 * kv_heads * head_dim`` per token and layer."""
        return sum(layer.batch_size * self.max_cache_len * layer.spec.dense_width * layer.k_latent.element_size()
                   for layer in self.layers)
