"""Per-layer compression report: shapes, ranks, parameters, scores, bytes and cost formulas.

Costs are sympy expressions in the number of tokens ``T``: a dense ``[m, n]``
linear costs ``2 T m n`` FLOPs, a factored one ``2 T k (m + n)``.
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

from .types import CompressedLayer, LayerStatus

log = logging.getLogger(__name__)

TOKENS = sympy.Symbol("T", positive=True, integer=True)


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
    factor_bytes: int
    reason: str

    @property
    def flops(self) -> sympy.Expr:
        """FLOPs of the layer for ``T`` tokens after compression."""
        return 2 * TOKENS * self.params_after


@dataclass
class CompressionReport:
    layers: list[LayerReport]
    config: Mapping[str, Any] = field(default_factory=dict)
    timings: Mapping[str, float] = field(default_factory=dict)

    def _compressible(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.status != LayerStatus.SKIPPED.value]

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
        return sum(layer.factor_bytes if layer.status == "factored" else layer.dense_bytes for layer in self._compressible())

    def formulas(self) -> dict[str, str]:
        layers = self._compressible()
        return {
            "params_dense": str(sympy.Add(*[sympy.Integer(layer.params_before) for layer in layers])),
            "params_compressed": str(sympy.Add(*[sympy.Integer(layer.params_after) for layer in layers])),
            "flops_dense(T)": str(sympy.expand(sum((2 * TOKENS * layer.params_before for layer in layers), sympy.Integer(0)))),
            "flops_compressed(T)": str(sympy.expand(sum((layer.flops for layer in layers), sympy.Integer(0)))),
            "layer_flops(T; m, n, k)": "dense 2*T*m*n, factored 2*T*k*(m + n)",
        }

    def totals(self) -> dict[str, Any]:
        return {
            "linears": len(self.layers),
            "factored": sum(layer.status == "factored" for layer in self.layers),
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
        }

    def to_markdown(self) -> str:
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
            f"\n**Totals:** {t['factored']} of {t['linears']} linears factored; parameters {t['params_before']:,} -> "
            f"{t['params_after']:,} (ratio {t['param_ratio']}); weight bytes measured {t['weight_bytes_before']:,} -> "
            f"{t['weight_bytes_after']:,} (ratio {t['weight_bytes_ratio']}).\n\n**Cost formulas (T = tokens):**\n\n"
        )
        formulas = "\n".join(f"- `{k}` = `{v}`" for k, v in self.formulas().items())
        return "\n".join(rows) + "\n" + summary + formulas + "\n"

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
            log.info("lowrank layer %s: %s rank=%s params %d -> %d %s", layer.name, layer.status, layer.rank,
                     layer.params_before, layer.params_after, layer.reason)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def layer_report(layer: CompressedLayer) -> LayerReport:
    plan = layer.plan
    return LayerReport(
        name=plan.name,
        out_features=plan.out_features,
        in_features=plan.in_features,
        method=layer.method,
        status=layer.status.value,
        rank=plan.rank,
        params_before=plan.dense_params,
        params_after=plan.params_after,
        sensitivity=plan.sensitivity,
        truncation_loss=plan.truncation_loss,
        dense_bytes=layer.dense_bytes,
        factor_bytes=layer.factor_bytes,
        reason=plan.reason,
    )


def build_report(
    layers: Iterable[CompressedLayer], config: Mapping[str, Any] | None = None, timings: Mapping[str, float] | None = None
) -> CompressionReport:
    return CompressionReport([layer_report(layer) for layer in layers], dict(config or {}), dict(timings or {}))


def model_report(model: nn.Module) -> CompressionReport:
    """The report of every layer of ``model`` compressed so far (across all its graphs)."""
    from lrcompile.runtime.compressed_layers import model_layers

    seen, layers = set(), []
    for _, layer in model_layers(model):
        if id(layer) not in seen:
            seen.add(id(layer))
            layers.append(layer)
    return build_report(layers)
