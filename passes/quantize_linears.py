"""Rewrite pass: quantise linears with AQLM codes, at full rank or as factors.

:func:`quantize_dense` fits a layer's weight ``W`` against its input Gram
``X X^T`` (:mod:`.additive_quantization`) into an :class:`~lrcompile.modules.AQLinear`;
:func:`quantize_factors` quantises the two factors of a factored layer into an
:class:`~lrcompile.modules.AQLowRankLinear`: ``down`` against ``X X^T``, then ``up``
against the Gram of its own input in the quantised model, ``D^ X X^T D^T``.
:func:`quantize_linears` rewrites the graph so each such layer is one
``lowrank::aq_linear`` call (two for a factor pair) reading the module's tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from lrcompile.kernels.aq_linear import codebook_dtype  # also registers torch.ops.lowrank.aq_linear
from lrcompile.modules import AQLinear, AQLowRankLinear, factor_bytes
from lrcompile.types import AQRecord, AQSpec, CompressedLayer, LayerPlan, LayerStatus, WeightLayout

from .additive_quantization import check_shape, fit_additive_quantization, relative_error
from .factorize_linears import add_frozen_parameter, replace_linear
from .find_linears import LinearNode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AQSettings:
    """What to fit: the shape and AQLM's search options (see ``fit_additive_quantization``)."""

    spec: AQSpec
    beam_size: int = 1
    tolerance: float = 0.01


def aq_weight_bytes(spec: AQSpec, out_features: int, in_features: int, dtype: torch.dtype) -> int:
    """Bytes an :class:`AQLinear` holds for an ``[out, in]`` weight of ``dtype``: codes, codebooks (in
    :func:`~lrcompile.kernels.aq_linear.codebook_dtype`) and per-row scales; a bias is kept either way."""
    codes = out_features * (in_features // spec.group_size) * spec.codebooks * spec.code_dtype.itemsize
    codebooks = spec.codebooks * 2**spec.bits * spec.group_size * codebook_dtype(dtype).itemsize
    return codes + codebooks + out_features * dtype.itemsize


def aq_would_not_save(spec: AQSpec, plan: LayerPlan, dtype: torch.dtype) -> str:
    """Why AQ codes for the layer ``plan`` describes (its weight, or at a rank its two factors) would hold at least
    their dense bytes, or ``""`` when they save bytes. Codebooks are a fixed cost per matrix: ``2x8`` at g=8 in
    float16 is 8 KiB, as much as a whole 32x64 float32 weight."""
    out, inp, rank = plan.out_features, plan.in_features, plan.rank
    shapes = [(out, inp)] if rank is None else [(rank, inp), (out, rank)]
    aq = sum(aq_weight_bytes(spec, rows, cols, dtype) for rows, cols in shapes)
    dense = sum(rows * cols for rows, cols in shapes) * dtype.itemsize
    if aq < dense:
        return ""
    return (f"AQ {spec.name} codes, codebooks and scales ({aq:,} bytes) would not save bytes against the "
            f"{dtype} weights ({dense:,} bytes)")


def _bits_per_weight(module: nn.Module, params: int) -> float:
    """Measured storage (codes, codebooks, scales) in bits per parameter it stands for."""
    return 8 * factor_bytes(module) / params


def quantize_dense(weight: Tensor, gram: Tensor | None, bias: nn.Parameter | None, record: CompressedLayer,
                   settings: AQSettings) -> AQLinear:
    """An :class:`AQLinear` for ``weight [out, in]``; ``record`` gets status ``QUANTIZED`` and its :class:`AQRecord`."""
    check_shape(settings.spec, *weight.shape, record.name)
    fit = fit_additive_quantization(weight, gram, settings.spec, settings.beam_size, settings.tolerance)
    module = AQLinear.from_codes(fit.codes, fit.codebooks, fit.scales, bias, record)
    record.status = LayerStatus.QUANTIZED
    record.quantization = AQRecord(settings.spec, _bits_per_weight(module, weight.numel()), fit.relative_error,
                                   fit.seconds)
    log.info("aq %s %s: %.3f bits/weight, output error %.4g, %.1f s", record.name, settings.spec.name,
             record.quantization.bits_per_weight, fit.relative_error, fit.seconds)
    return module


def quantize_factors(weight: Tensor, down: Tensor, up: Tensor, gram: Tensor | None, bias: nn.Parameter | None,
                     record: CompressedLayer, settings: AQSettings) -> AQLowRankLinear:
    """An :class:`AQLowRankLinear` for the factors ``down [r, in]``, ``up [out, r]`` of ``weight``; the record's
    output error is the whole layer's (truncation and quantisation) against the dense weight."""
    check_shape(settings.spec, *down.shape, record.name + " (down factor)")
    check_shape(settings.spec, *up.shape, record.name + " (up factor, input width = rank)")
    fit_down = fit_additive_quantization(down, gram, settings.spec, settings.beam_size, settings.tolerance)
    q_down = AQLinear.from_codes(fit_down.codes, fit_down.codebooks, fit_down.scales, None)
    down_hat = q_down.dequantized_weight().double()
    base = torch.eye(down.shape[1], dtype=torch.float64, device=down.device) if gram is None else gram.double()
    fit_up = fit_additive_quantization(up, down_hat @ base @ down_hat.T, settings.spec, settings.beam_size,
                                       settings.tolerance)
    q_up = AQLinear.from_codes(fit_up.codes, fit_up.codebooks, fit_up.scales, bias)
    module = AQLowRankLinear(q_down, q_up, record)
    error = relative_error(q_up.dequantized_weight().double() @ down_hat - weight.double(), weight, base)
    record.quantization = AQRecord(settings.spec, _bits_per_weight(module, down.numel() + up.numel()), error,
                                   fit_down.seconds + fit_up.seconds)
    log.info("aq %s factors (rank %d) %s: %.3f bits/weight, output error %.4g", record.name, module.rank,
             settings.spec.name, record.quantization.bits_per_weight, error)
    return module


def _aq_call(graph: fx.Graph, gm: fx.GraphModule, name: str, x: Any, module: AQLinear, bias: Any) -> fx.Node:
    args = [graph.get_attr(add_frozen_parameter(gm, name, part, getattr(module, part)))
            for part in ("codes", "codebooks", "scales")]
    return graph.call_function(torch.ops.lowrank.aq_linear.default, (x, *args, bias))


def quantize_linear(gm: fx.GraphModule, view: LinearNode, module: AQLinear | AQLowRankLinear) -> None:
    """Replace ``view.node`` by ``aq_linear`` calls reading ``module``'s codes, codebooks and scales."""
    graph, node, name = gm.graph, view.node, view.meta.name
    with graph.inserting_before(node):
        bias: Any = view.bias
        if view.layout is WeightLayout.MODULE:
            bias = None if module.bias is None else graph.get_attr(add_frozen_parameter(gm, name, "bias", module.bias))
        if isinstance(module, AQLowRankLinear):
            latent = _aq_call(graph, gm, name + "_down", view.input, module.down, None)
            out = _aq_call(graph, gm, name + "_up", latent, module.up, bias)
            replace_linear(view, out, latent, module.rank)
        else:
            replace_linear(view, _aq_call(graph, gm, name, view.input, module, bias))


def quantize_linears(gm: fx.GraphModule, modules: Mapping[LinearNode, AQLinear | AQLowRankLinear]) -> None:
    for view, module in modules.items():
        quantize_linear(gm, view, module)
    gm.graph.lint()
    gm.recompile()
    log.info("quantised %d linears", len(modules))


def is_aq_call(node: fx.Node) -> bool:
    """Whether ``node`` runs an AQ linear (a model compressed already holds such layers)."""
    return node.op == "call_function" and node.target in (torch.ops.lowrank.aq_linear.default,
                                                          torch.ops.lowrank.aq_linear)

