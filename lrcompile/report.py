"""Per-layer compression report: shapes, ranks, parameters, scores, bytes and cost formulas.

Costs are sympy expressions in the number of tokens ``T``: a dense ``[m, n]``
linear costs ``2 T m n`` FLOPs, a factored one ``2 T k (m + n)``. Attention
blocks restructured for a latent KV cache get their own rows: K/V ranks per
group and KV-cache bytes as functions of batch ``B`` and cached tokens ``T``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import sympy
from torch import nn

from .types import CompressedLayer, LatentAttention, LayerStatus

log = logging.getLogger(__name__)

TOKENS = sympy.Symbol("T", positive=True, integer=True)
BATCH = sympy.Symbol("B", positive=True, integer=True)
POSITION_BYTES = 8  # the runtime cache's int64 RoPE position per cached token (shared by all layers)


@dataclass(frozen=True)
class AttentionReport:
    """One attention block restructured for a latent KV cache."""

    name: str
    method: str
    group_size: int
    groups: int
    k_rank: int  # per group
    v_rank: int
    latent_width: int  # cached values per token
    dense_width: int  # 2 * kv_heads * head_dim
    itemsize: int
    weight_bytes_before: int  # dense K and V projections
    weight_bytes_after: int  # their group factors (the output projection stays as it was)
    k_truncation_loss: float | None
    v_truncation_loss: float | None

    @property
    def kv_bytes_dense(self) -> sympy.Expr:
        return BATCH * TOKENS * self.dense_width * self.itemsize

    @property
    def kv_bytes_latent(self) -> sympy.Expr:
        """The block's latents; the cache adds ``B * T * POSITION_BYTES`` once for all blocks."""
        return BATCH * TOKENS * self.latent_width * self.itemsize


@dataclass(frozen=True)
class LayerReport:
    name: str
    out_features: int
    in_features: int
    method: str
    status: str
    rank: int | None
    params_before: int
    params_after: int
    sensitivity: float | None
    truncation_loss: float | None
    dense_bytes: int
    factor_bytes: int  # bytes of the factors, or of the codes, codebooks and scales, holding the layer
    reason: str
    quantization: str | None = None  # AQLM "MxB g=G" when the weight or its factors are quantised
    bits_per_weight: float | None = None  # measured, codes + codebooks + scales over the parameters they stand for
    output_error: float | None = None  # tr(dW XX^T dW^T) / tr(W XX^T W^T) on calibration data

    @property
    def flops(self) -> sympy.Expr:
        """FLOPs of the layer for ``T`` tokens after compression."""
        return 2 * TOKENS * self.params_after


@dataclass
class CompressionReport:
    layers: list[LayerReport]
    config: Mapping[str, Any] = field(default_factory=dict)
    timings: Mapping[str, float] = field(default_factory=dict)
    attention: list[AttentionReport] = field(default_factory=list)
    attention_left_dense: list[tuple[str, str]] = field(default_factory=list)  # (block, reason)
    kv_bytes_measured: tuple[int, int] | None = None  # (latent cache, dense cache of the same capacity)

    def _compressible(self) -> list[LayerReport]:
        """Linears under the parameter budget (K/V/output projections of latent attention are reported apart)."""
        return [layer for layer in self.layers if layer.status not in (LayerStatus.SKIPPED.value, LayerStatus.LATENT.value)]

    @property
    def params_before(self) -> int:
        return sum(layer.params_before for layer in self._compressible())

    @property
    def params_after(self) -> int:
        return sum(layer.params_after for layer in self._compressible())

    @property
    def param_ratio(self) -> float:
        return self.params_after / max(self.params_before, 1)

    @property
    def bytes_before(self) -> int:
        """Measured bytes of the dense weights of the compressible linears."""
        return sum(layer.dense_bytes for layer in self._compressible())

    @property
    def bytes_after(self) -> int:
        """Measured bytes held for them after compression: factors, plus weights left dense."""
        held = (LayerStatus.FACTORED.value, LayerStatus.QUANTIZED.value)
        return sum(layer.factor_bytes if layer.status in held else layer.dense_bytes for layer in self._compressible())

    def formulas(self) -> dict[str, str]:
        layers = self._compressible()
        return {
            "params_dense": str(sympy.Add(*[sympy.Integer(layer.params_before) for layer in layers])),
            "params_compressed": str(sympy.Add(*[sympy.Integer(layer.params_after) for layer in layers])),
            "flops_dense(T)": str(sympy.expand(sum((2 * TOKENS * layer.params_before for layer in layers), sympy.Integer(0)))),
            "flops_compressed(T)": str(sympy.expand(sum((layer.flops for layer in layers), sympy.Integer(0)))),
            "layer_flops(T; m, n, k)": "dense 2*T*m*n, factored 2*T*k*(m + n)",
            **self.kv_formulas(),
        }

    def kv_formulas(self) -> dict[str, str]:
        if not self.attention:
            return {}
        dense = sympy.expand(sum((a.kv_bytes_dense for a in self.attention), sympy.Integer(0)))
        latent = sympy.expand(sum((a.kv_bytes_latent for a in self.attention), BATCH * TOKENS * POSITION_BYTES))
        return {
            "kv_cache_bytes_dense(B, T)": str(dense),
            "kv_cache_bytes_latent(B, T)": str(latent),
            "kv_cache_ratio": str(sympy.nsimplify(sympy.simplify(latent / dense))),
        }

    def totals(self) -> dict[str, Any]:
        return {
            "linears": len(self._compressible()),  # those the parameter budget covers
            "skipped": sum(layer.status == LayerStatus.SKIPPED.value for layer in self.layers),
            "factored": sum(layer.status == "factored" for layer in self.layers),
            "quantized": sum(layer.quantization is not None for layer in self.layers),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "param_ratio": round(self.param_ratio, 4),
            "weight_bytes_before": self.bytes_before,
            "weight_bytes_after": self.bytes_after,
            "weight_bytes_ratio": round(self.bytes_after / max(self.bytes_before, 1), 4),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.config.items()},
            "totals": self.totals(),
            "formulas": self.formulas(),
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            "layers": [asdict(layer) for layer in self.layers],
            "attention": [asdict(block) for block in self.attention],
            "attention_left_dense": [{"name": n, "reason": r} for n, r in self.attention_left_dense],
            "kv_bytes_measured": None if self.kv_bytes_measured is None else
            {"latent": self.kv_bytes_measured[0], "dense": self.kv_bytes_measured[1]},
        }

    def to_markdown(self) -> str:
        if not self.layers and not self.attention and not self.attention_left_dense:
            return ("Nothing to report: no layer here was compressed or skipped by lrcompile (from `model_report`: "
                    "the model has not been compressed).\n")
        rows = [
            "| layer | shape (out x in) | method | status | rank | params before | params after | sensitivity (KL) | truncation loss | note |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for layer in self.layers:
            rows.append(
                f"| {layer.name} | {layer.out_features} x {layer.in_features} | {layer.method or '-'} | {layer.status} | "
                f"{layer.rank if layer.rank is not None else '-'} | {layer.params_before:,} | {layer.params_after:,} | "
                f"{_num(layer.sensitivity)} | {_num(layer.truncation_loss)} | {layer.reason} |"
            )
        t = self.totals()
        summary = (
            f"\n**Totals:** {t['factored']} of {t['linears']} linears factored{_quantized(t['quantized'])}"
            f"{_skipped(t['skipped'])}; parameters "
            f"{t['params_before']:,} -> {t['params_after']:,} (ratio {t['param_ratio']}); weight bytes measured "
            f"{t['weight_bytes_before']:,} -> {t['weight_bytes_after']:,} (ratio {t['weight_bytes_ratio']}).{self._latent_note()}\n\n"
            "**Cost formulas (T = tokens):**\n\n"
        )
        formulas = "\n".join(f"- `{k}` = `{v}`" for k, v in self.formulas().items())
        return "\n".join(rows) + "\n" + summary + formulas + "\n" + self._quantization_markdown() + self._attention_markdown()

    def _latent_note(self) -> str:
        """Where the weights of latent attention are counted, which the totals leave out."""
        kept = [layer for layer in self.layers if layer.status == LayerStatus.LATENT.value]
        if not kept and not self.attention:
            return ""
        before = sum(a.weight_bytes_before for a in self.attention)
        after = sum(a.weight_bytes_after for a in self.attention)
        return (f" Not in these totals: the K/V projections of latent attention ({before:,} -> {after:,} bytes, "
                f"section Latent KV cache) and its {len(kept)} output projection(s), kept dense "
                f"({sum(layer.dense_bytes for layer in kept):,} bytes).")

    def _quantization_markdown(self) -> str:
        quantized = [layer for layer in self.layers if layer.quantization is not None]
        if not quantized:
            return ""
        rows = ["\n## AQLM quantisation\n",
                "| layer | status | rank | codes | bits / weight (measured, incl. codebooks and scales) | bytes | output error |",
                "|---|---|---:|---|---:|---:|---:|"]
        rows += [f"| {q.name} | {q.status} | {q.rank if q.rank is not None else '-'} | {q.quantization} | "
                 f"{q.bits_per_weight:.3f} | {q.factor_bytes:,} | {_num(q.output_error)} |" for q in quantized]
        return "\n".join(rows) + "\n"

    def _attention_markdown(self) -> str:
        if not self.attention and not self.attention_left_dense:
            return ""
        rows = [
            "\n## Latent KV cache\n",
            "| block | method | group size | groups | K rank | V rank | KV values per token dense -> latent | "
            "KV bytes per token dense -> latent | weight bytes before -> after | K / V truncation loss |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for a in self.attention:
            # at full rank every method is the exact SVD, which the pass uses whatever was asked
            method = a.method if a.latent_width < a.dense_width else f"{a.method} (full rank: exact)"
            rows.append(
                f"| {a.name} | {method} | {a.group_size} | {a.groups} | {a.k_rank} | {a.v_rank} | "
                f"{a.dense_width} -> {a.latent_width} | {a.dense_width * a.itemsize} -> "
                f"{a.latent_width * a.itemsize} | {a.weight_bytes_before:,} -> {a.weight_bytes_after:,} | "
                f"{_num(a.k_truncation_loss)} / {_num(a.v_truncation_loss)} |"
            )
        if self.attention:
            rows.append(f"\nThe runtime cache also keeps each token's RoPE position ({POSITION_BYTES} bytes per token, "
                        "shared by all layers).")
        rows += [f"- left dense: {name}: {reason}" for name, reason in self.attention_left_dense]
        if self.kv_bytes_measured is not None:
            latent, dense = self.kv_bytes_measured
            rows.append(f"\n**KV cache measured:** {latent:,} bytes allocated vs {dense:,} for a dense cache of the same "
                        f"capacity (ratio {latent / max(dense, 1):.4f}).")
        return "\n".join(rows) + "\n"

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.json").write_text(json.dumps(self.to_json(), indent=2))
        (folder / "report.md").write_text(self.to_markdown())

    def log(self) -> None:
        t = self.totals()
        log.info(
            "lowrank: %d/%d linears factored, params %.3f of dense, weight bytes %d -> %d",
            t["factored"], t["linears"], t["param_ratio"], t["weight_bytes_before"], t["weight_bytes_after"],
        )
        for layer in self.layers:
            log.info("lowrank layer %s: %s rank=%s params %d -> %d %s%s", layer.name, layer.status, layer.rank,
                     layer.params_before, layer.params_after, layer.reason,
                     "" if layer.quantization is None else f" aq {layer.quantization} {layer.bits_per_weight:.3f} "
                     f"bits/weight output error {_num(layer.output_error)}")


def _quantized(count: int) -> str:
    return f", {count} AQLM-quantised (factored or at full rank)" if count else ""


def _skipped(count: int) -> str:
    return f" ({count} more skipped, not in these totals)" if count else ""


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


QUANTIZED_WHOLE = "kept at full rank, its weight AQLM codes"


def layer_report(layer: CompressedLayer, factor_bytes: int = 0) -> LayerReport:
    """``factor_bytes``: the bytes of the factors holding a factored layer (its module's parameters)."""
    plan, aq = layer.plan, layer.quantization
    whole = layer.status is LayerStatus.QUANTIZED  # the plan's method and reason are about factoring, not done here
    return LayerReport(
        name=plan.name,
        out_features=plan.out_features,
        in_features=plan.in_features,
        method="aqlm" if whole else layer.method,
        status=layer.status.value,
        rank=plan.rank,
        params_before=plan.dense_params,
        params_after=plan.params_after,
        sensitivity=plan.sensitivity,
        truncation_loss=plan.truncation_loss,
        dense_bytes=layer.dense_bytes,
        factor_bytes=factor_bytes,
        reason=QUANTIZED_WHOLE if whole else plan.reason,
        quantization=None if aq is None else f"{aq.spec.name} g={aq.spec.group_size}",
        bits_per_weight=None if aq is None else aq.bits_per_weight,
        output_error=None if aq is None else aq.output_error,
    )


def attention_report(layer: LatentAttention, factor_bytes: int) -> AttentionReport:
    """``factor_bytes``: the bytes of the block's K and V group factors."""
    return AttentionReport(
        name=layer.name, method=layer.method, group_size=layer.group_size, groups=layer.groups, k_rank=layer.k_rank,
        v_rank=layer.v_rank, latent_width=layer.latent_width, dense_width=layer.dense_width,
        itemsize=layer.itemsize, weight_bytes_before=layer.dense_bytes,
        weight_bytes_after=factor_bytes, k_truncation_loss=layer.k_truncation_loss,
        v_truncation_loss=layer.v_truncation_loss,
    )


def build_report(
    layers: Iterable[tuple[CompressedLayer, int]],
    config: Mapping[str, Any] | None = None,
    timings: Mapping[str, float] | None = None,
    attention: Iterable[tuple[LatentAttention, int]] = (),
    attention_left_dense: Iterable[tuple[str, str]] = (),
) -> CompressionReport:
    """``layers`` and ``attention``: each record with the bytes of the factors that hold it."""
    return CompressionReport([layer_report(*pair) for pair in layers], dict(config or {}), dict(timings or {}),
                             [attention_report(*pair) for pair in attention], list(attention_left_dense))


def model_report(model: nn.Module, cache: Any = None) -> CompressionReport:
    """The report of every layer of ``model`` compressed so far, read from its modules in the dtype they hold
    now; with a :class:`~lrcompile.LatentKVCache`, also the KV-cache bytes it actually allocated."""
    from lrcompile.modules import (
        GroupedLowRankProjection,
        attention_left_dense,
        compressed_modules,
        current_record,
        factor_bytes,
    )

    layers, blocks = [], {}
    for _, module in compressed_modules(model):
        record = current_record(module)
        if isinstance(module, GroupedLowRankProjection):
            key = id(module.lowrank_record)  # shared by the block's K and V projections
            blocks[key] = (record, blocks.get(key, (record, 0))[1] + factor_bytes(module))
        else:
            held = record.status in (LayerStatus.FACTORED, LayerStatus.QUANTIZED)
            layers.append((record, factor_bytes(module) if held else 0))
    report = build_report(layers, attention=list(blocks.values()), attention_left_dense=attention_left_dense(model))
    if cache is not None:
        report.kv_bytes_measured = (cache.latent_bytes, cache.dense_bytes())
    return report
