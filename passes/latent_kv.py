"""Rewrite pass: restructure recognised attention blocks so only a low-rank latent K/V is computed and cached.

Per block (Palu, arXiv 2407.21118):

* K and V projections are split into groups of ``group_size`` KV heads and each
  group ``W_g`` (``[group_size * D, hidden]``) is factored ``W_g ~ U_g D_g`` with
  the foundation's methods (``svd``/``asvd``/``whiten``), so ``latent = D x``;
* the K latent is pre-RoPE; :func:`lowrank::latent_attention` reconstructs K,
  applies RoPE at each key's position and attends;
* V's up-projection is folded into the output projection (Palu Eq. 6), so
  attention accumulates the V latent and ``o_proj`` reads ``[B, T, Hq * r_v]``.

Without a runtime cache the block attends over the chunk's own latents; with the
cache's marker in the graph the latents are written into the cache buffers
first (``lowrank::write_latent_cache``) and attention reads the whole cache.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from lrcompile.errors import LowRankConfigError
from lrcompile.kernels.latent_attention import latent_attention  # noqa: F401  (registers the op)
from lrcompile.kernels.latent_cache import write_latent_cache  # noqa: F401  (registers the op)
from lrcompile.types import ActivationStats, LatentAttention

from .attention_blocks import AttentionBlock
from .decomposition import LinearDecomposition, decompose
from .factorize_linears import add_frozen_parameter
from .find_linears import weight_tensor

log = logging.getLogger(__name__)


def check_group_size(group_size: int, num_kv_heads: int, block: str) -> None:
    if num_kv_heads % group_size:
        raise LowRankConfigError(
            f"option 'kv_group_size'={group_size} does not divide the {num_kv_heads} KV heads of {block}; "
            f"use a divisor of {num_kv_heads} (1 = per head, {num_kv_heads} = all heads jointly)"
        )


def group_decompositions(
    weight: torch.Tensor,
    groups: int,
    method: str,
    stats: ActivationStats | None,
    alpha: float,
    name: str,
) -> list[LinearDecomposition]:
    """One decomposition per group of rows of a K or V projection ``[kv_heads * D, hidden]``."""
    width = weight.shape[0] // groups
    return [decompose(weight[g * width : (g + 1) * width], method, stats, alpha, f"{name}[group {g}]") for g in range(groups)]


def factor_kv_groups(
    weight: torch.Tensor,
    groups: int,
    rank: int,
    method: str,
    stats: ActivationStats | None,
    alpha: float,
    name: str,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Group-head low-rank decomposition of a K or V projection ``[kv_heads * D, hidden]``.

    Returns ``down [groups * rank, hidden]``, ``up [groups, width, rank]`` and the
    mean truncation loss over the groups (dropped energy share of the scaled weight).
    """
    width = weight.shape[0] // groups
    if not 1 <= rank <= width:
        raise LowRankConfigError(
            f"{name}: rank {rank} per group is outside [1, {width}] (the group's dense width, "
            f"{weight.shape[0]} rows in {groups} groups)"
        )
    decompositions = group_decompositions(weight, groups, method, stats, alpha, name)
    downs, ups = zip(*(d.factors(rank, weight.dtype) for d in decompositions))
    losses = [d.truncation_loss(rank) for d in decompositions]
    return torch.cat(downs), torch.stack(ups), sum(losses) / len(losses)


def fold_value_up(
    o_weight: torch.Tensor,
    o_bias: torch.Tensor | None,
    v_up: torch.Tensor,
    v_bias: torch.Tensor | None,
    num_heads: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``W'[:, h] = W_o[:, h] U^v_{j(h)}`` and ``b' = b_o + sum_h W_o[:, h] b^v_{j(h)}`` (Palu Eq. 6).

    ``j(h) = h // n_rep`` is the KV head of query head ``h``; ``U^v_j`` is its ``[D, r]``
    slice of its group's up-projection. Computed in float64.
    """
    groups, width, rank = v_up.shape
    kv_heads = groups * width // head_dim
    n_rep = num_heads // kv_heads
    w_o = o_weight.detach().double()
    up = v_up.double().reshape(kv_heads, head_dim, rank)
    blocks = [w_o[:, h * head_dim : (h + 1) * head_dim] @ up[h // n_rep] for h in range(num_heads)]
    weight = torch.cat(blocks, dim=1).to(o_weight.dtype).contiguous()
    bias = None if o_bias is None else o_bias.detach().double()
    if v_bias is not None:
        b_v = v_bias.detach().double().reshape(kv_heads, head_dim)
        shift = sum(w_o[:, h * head_dim : (h + 1) * head_dim] @ b_v[h // n_rep] for h in range(num_heads))
        bias = shift if bias is None else bias + shift
    return weight, None if bias is None else bias.to(o_weight.dtype).contiguous()


def build_latent_attention(
    block: AttentionBlock,
    weights: Mapping[str, torch.Tensor | None],
    group_size: int,
    k_rank: int,
    v_rank: int,
    method: str,
    stats: ActivationStats | None,
    alpha: float,
) -> LatentAttention:
    """Factor one block's K/V per group and fold V's up-projection into ``o_proj``.

    ``weights`` holds the dense ``k``, ``v``, ``o`` weights and ``k_bias``, ``v_bias``, ``o_bias``.
    """
    check_group_size(group_size, block.num_kv_heads, block.name)
    groups = block.num_kv_heads // group_size
    k_down, k_up, k_loss = factor_kv_groups(weights["k"], groups, k_rank, method, stats, alpha, f"{block.name} K")
    v_down, v_up, v_loss = factor_kv_groups(weights["v"], groups, v_rank, method, stats, alpha, f"{block.name} V")
    o_weight, o_bias = fold_value_up(weights["o"], weights["o_bias"], v_up, weights["v_bias"], block.num_heads, block.head_dim)
    dense_bytes = sum(weights[k].untyped_storage().nbytes() for k in ("k", "v", "o"))
    k_bias = weights["k_bias"]
    return LatentAttention(
        name=block.name, method=method, group_size=group_size, num_heads=block.num_heads,
        num_kv_heads=block.num_kv_heads, head_dim=block.head_dim, k_rank=k_rank, v_rank=v_rank,
        dtype=weights["k"].dtype, k_down=k_down, k_up=k_up, k_bias=None if k_bias is None else k_bias.detach().clone(),
        v_down=v_down, v_up=v_up, o_weight=o_weight, o_bias=o_bias, dense_bytes=dense_bytes, k_truncation_loss=k_loss,
        v_truncation_loss=v_loss,
    )


def low_rank_product(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The dense ``[groups * width, hidden]`` projection of group factors ``up [groups, width, r]``, ``down [groups * r, hidden]``."""
    groups, _, rank = up.shape
    return torch.cat([up[g] @ down[g * rank : (g + 1) * rank] for g in range(groups)])


def eager_output_weight(layer: LatentAttention) -> torch.Tensor:
    """An output projection ``[out, heads * D]`` that, applied to attention over the low-rank V
    ``U^v D^v x``, equals the folded ``o_weight`` applied to attention over the V latent.

    Per query head ``W_h = o_weight_h pinv(U^v_{j(h)})``: since ``o_weight_h = W_o,h U^v_j``,
    ``W_h U^v_j = W_o,h U^v_j pinv(U^v_j) U^v_j = o_weight_h``. Computed in float64.
    """
    up = layer.v_up.double().reshape(layer.num_kv_heads, layer.head_dim, layer.v_rank)
    n_rep = layer.num_heads // layer.num_kv_heads
    pinvs = torch.linalg.pinv(up)  # [kv_heads, v_rank, D]
    o = layer.o_weight.double()
    blocks = [o[:, h * layer.v_rank : (h + 1) * layer.v_rank] @ pinvs[h // n_rep] for h in range(layer.num_heads)]
    return torch.cat(blocks, dim=1).to(layer.o_weight.dtype)


def _frozen_attr(gm: fx.GraphModule, block: str, part: str, tensor: torch.Tensor | None, graph: fx.Graph) -> fx.Node | None:
    if tensor is None:
        return None
    return graph.get_attr(add_frozen_parameter(gm, block, part, tensor))


def restructure_block(gm: fx.GraphModule, block: AttentionBlock, layer: LatentAttention) -> None:
    """Replace the block's K/V projections, cache marker, attention and output projection
    by latent projections, ``lowrank::latent_attention`` and the folded output projection."""
    graph = gm.graph
    x = block.k_linear.input
    with graph.inserting_before(block.attention):
        k_down = _frozen_attr(gm, block.name, "k_down", layer.k_down, graph)
        v_down = _frozen_attr(gm, block.name, "v_down", layer.v_down, graph)
        k_up = _frozen_attr(gm, block.name, "k_up", layer.k_up, graph)
        k_bias = _frozen_attr(gm, block.name, "k_bias", layer.k_bias, graph)
        o_weight = _frozen_attr(gm, block.name, "o_weight", layer.o_weight, graph)
        o_bias = _frozen_attr(gm, block.name, "o_bias", layer.o_bias, graph)
        k_latent = graph.call_function(F.linear, (x, k_down))
        v_latent = graph.call_function(F.linear, (x, v_down))
        positions = block.positions
        if block.marker is not None:
            _, _, k_cache, v_cache, pos_cache, length = block.marker.args
            graph.call_function(torch.ops.lowrank.write_latent_cache.default,
                                (k_cache, v_cache, pos_cache, length, k_latent, v_latent, positions))
            k_latent, v_latent, positions = k_cache, v_cache, pos_cache
            if block.cache_slots is not None:
                head = (slice(None), slice(None, block.cache_slots))
                k_latent, v_latent, positions = (graph.call_function(operator.getitem, (t, head))
                                                 for t in (k_cache, v_cache, pos_cache))
        attended = graph.call_function(
            torch.ops.lowrank.latent_attention.default,
            (block.query, k_latent, v_latent, positions, k_up, k_bias, block.inv_freq, block.rope_scale, block.mask,
             block.scale, block.is_causal),
        )
    o_node = block.o_linear.node
    with graph.inserting_before(o_node):
        out = graph.call_function(F.linear, (attended, o_weight, o_bias))
    out.meta.update({k: v for k, v in o_node.meta.items() if k in ("nn_module_stack", "stack_trace", "example_value", "val")})
    o_node.replace_all_uses_with(out)
    graph.erase_node(o_node)


def restructure_attention(gm: fx.GraphModule, layers: Sequence[tuple[AttentionBlock, LatentAttention]]) -> None:
    """Rewrite every ``(block, layer)`` pair, then drop the dense K/V path left without users."""
    for block, layer in layers:
        restructure_block(gm, block, layer)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    log.info("restructured %d attention blocks for a latent KV cache", len(layers))


def block_weights(gm: fx.GraphModule, block: AttentionBlock, values: Mapping[fx.Node, Any]) -> dict[str, torch.Tensor | None]:
    """Dense weights and biases of a block's K, V and output projections."""
    def bias(view):
        if view.bias is None:
            return None
        return values[view.bias] if view.bias.op == "placeholder" else getattr(gm, str(view.bias.target))

    return {
        "k": weight_tensor(gm, block.k_linear, values), "v": weight_tensor(gm, block.v_linear, values),
        "o": weight_tensor(gm, block.o_linear, values), "k_bias": bias(block.k_linear),
        "v_bias": bias(block.v_linear), "o_bias": bias(block.o_linear),
    }
