"""Rewrite pass: restructure recognised attention blocks so only a low-rank latent K/V is computed and cached.

Per block (Palu, arXiv 2407.21118):

* K and V projections are split into groups of ``group_size`` KV heads and each
  group ``W_g`` (``[group_size * D, hidden]``) is factored ``W_g ~ U_g D_g`` with
  the foundation's methods (``svd``/``asvd``/``whiten``), so ``latent = D x``;
  with ``whiten`` the truncation error is weighed where it lands, K's in the
  attention scores and V's after ``o_proj`` (:mod:`.kv_metrics`); the factors
  become the block's ``GroupedLowRankProjection`` modules;
* the K latent is pre-RoPE; :func:`lowrank::latent_attention` reconstructs K,
  applies RoPE at each key's position and attends, accumulating the V latent;
* V's up-projection is applied per query head after attention (attention is
  linear in V), and the model's own output projection reads the merged heads.
  Folding it into ``o_proj`` (Palu Eq. 6) would need a second, wider output
  weight per block next to the dense one eager calls use.

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
from lrcompile.modules import GroupedLowRankProjection
from lrcompile.types import ActivationStats, LatentAttention

from .attention_blocks import AttentionBlock, GroupedProjectionNode
from .decomposition import LinearDecomposition, decompose, shared_whitening
from .factorize_linears import add_frozen_parameter
from .kv_metrics import KVMetric
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
    metrics: Sequence[torch.Tensor] | None = None,
) -> list[LinearDecomposition]:
    """One decomposition per group of rows of a K or V projection ``[kv_heads * D, hidden]``; ``metrics``: each
    group's output metric (:meth:`KVMetric.group`), for ``whiten``."""
    width = weight.shape[0] // groups
    whitening = shared_whitening(method, stats, name)  # the groups read one input
    return [decompose(weight[g * width : (g + 1) * width], method, stats, alpha, f"{name}[group {g}]", whitening,
                      None if metrics is None else metrics[g])
            for g in range(groups)]


def factor_kv_groups(
    weight: torch.Tensor,
    groups: int,
    rank: int,
    method: str,
    stats: ActivationStats | None,
    alpha: float,
    name: str,
    metrics: Sequence[torch.Tensor] | None = None,
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
    decompositions = group_decompositions(weight, groups, method, stats, alpha, name, metrics)
    downs, ups = zip(*(d.factors(rank, weight.dtype) for d in decompositions))
    losses = [d.truncation_loss(rank) for d in decompositions]
    return torch.cat(downs), torch.stack(ups), sum(losses) / len(losses)


def build_latent_attention(
    block: AttentionBlock,
    weights: Mapping[str, torch.Tensor | None],
    group_size: int,
    k_rank: int,
    v_rank: int,
    method: str,
    stats: ActivationStats | None,
    alpha: float,
    metric: KVMetric | None = None,
) -> tuple[LatentAttention, GroupedLowRankProjection, GroupedLowRankProjection]:
    """Factor one block's K and V per group: its record and the modules replacing ``k_proj`` and ``v_proj``;
    ``metric``: the errors' weighting by the scores and the output projection (``whiten``).

    ``weights`` holds the dense ``k``, ``v`` weights and the ``k_bias``, ``v_bias`` parameters, which the
    new modules keep as they are (bias ``[kv_heads * D]`` is added after the up-projection).
    """
    check_group_size(group_size, block.num_kv_heads, block.name)
    groups = block.num_kv_heads // group_size
    k_down, k_up, k_loss = factor_kv_groups(weights["k"], groups, k_rank, method, stats, alpha, f"{block.name} K",
                                            None if metric is None else metric.group("k", groups))
    v_down, v_up, v_loss = factor_kv_groups(weights["v"], groups, v_rank, method, stats, alpha, f"{block.name} V",
                                            None if metric is None else metric.group("v", groups))
    record = LatentAttention(
        name=block.name, method=method, group_size=group_size, num_heads=block.num_heads,
        num_kv_heads=block.num_kv_heads, head_dim=block.head_dim, k_rank=k_rank, v_rank=v_rank,
        dtype=weights["k"].dtype, dense_bytes=sum(weights[k].untyped_storage().nbytes() for k in ("k", "v")),
        k_truncation_loss=k_loss, v_truncation_loss=v_loss,
    )
    k_module = GroupedLowRankProjection.from_factors(k_down, k_up, weights["k_bias"], record, "k")
    v_module = GroupedLowRankProjection.from_factors(v_down, v_up, weights["v_bias"], record, "v")
    return record, k_module, v_module


def _projection_nodes(gm: fx.GraphModule, block: AttentionBlock, view, module: GroupedLowRankProjection | None,
                      graph: fx.Graph, x: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None]:
    """``(latent, up, bias)`` nodes of a K or V projection: those of the graph when it is restructured
    already, else new ones reading ``module``'s parameters (the very tensors the model will hold)."""
    if isinstance(view, GroupedProjectionNode):
        return view.latent.node, view.up, view.bias
    role = "k" if view is block.k_linear else "v"

    def attr(part: str, tensor: torch.Tensor | None) -> fx.Node | None:
        return None if tensor is None else graph.get_attr(add_frozen_parameter(gm, block.name, f"{role}_{part}", tensor))

    latent = graph.call_function(F.linear, (x, attr("down", module.down)))
    return latent, attr("up", module.up), attr("bias", module.bias)


def restructure_block(gm: fx.GraphModule, block: AttentionBlock, record: LatentAttention,
                      modules: tuple[GroupedLowRankProjection, GroupedLowRankProjection] | None = None) -> None:
    """Replace the block's K/V projections, cache marker and attention by the latent projections,
    ``lowrank::latent_attention`` over the latents and V's up-projection per query head; the output
    projection reads the result as it read the merged heads. ``modules``: the new K and V modules of a
    block restructured now (None when the graph already calls them)."""
    graph = gm.graph
    x = block.k_linear.input
    k_module, v_module = modules or (None, None)
    with graph.inserting_before(block.attention):
        k_latent, k_up, k_bias = _projection_nodes(gm, block, block.k_linear, k_module, graph, x)
        v_latent, v_up, v_bias = _projection_nodes(gm, block, block.v_linear, v_module, graph, x)
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
        # attention weights sum to one, so attention over V = U^v z + b_v is U^v (attention over z) + b_v, per
        # query head h with KV head j(h) = h // n_rep: [B, T, Hq * r_v] -> the merged heads [B, T, Hq * D]
        n_rep = block.num_heads // block.num_kv_heads
        per_head = graph.call_method("reshape", (v_up, block.num_kv_heads, block.head_dim, record.v_rank))
        per_head = graph.call_method("repeat_interleave", (per_head, n_rep, 0))
        head_bias = None
        if v_bias is not None:
            head_bias = graph.call_method("reshape", (v_bias, block.num_kv_heads, block.head_dim))
            head_bias = graph.call_method("reshape", (graph.call_method("repeat_interleave", (head_bias, n_rep, 0)), -1))
        merged = graph.call_function(torch.ops.lowrank.grouped_up_projection.default, (attended, per_head, head_bias))
    merged.meta.update({k: v for k, v in block.merged.meta.items() if k in ("example_value", "val")})
    block.o_linear.node.replace_input_with(block.merged, merged)


def restructure_attention(gm: fx.GraphModule, blocks: Sequence[tuple[AttentionBlock, LatentAttention, tuple | None]]) -> None:
    """Rewrite every ``(block, record, new modules or None)``, then drop the dense K/V path left without users."""
    for block, record, modules in blocks:
        restructure_block(gm, block, record, modules)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    log.info("restructured %d attention blocks for a latent KV cache", len(blocks))


def block_weights(gm: fx.GraphModule, block: AttentionBlock, values: Mapping[fx.Node, Any]) -> dict[str, torch.Tensor]:
    """Dense weights of a block's K and V projections (the model's own parameters)."""
    return {"k": weight_tensor(gm, block.k_linear, values), "v": weight_tensor(gm, block.v_linear, values)}
