"""The compression pipeline on one captured graph: find, reuse, observe, plan, factor, release."""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import fx

from lrcompile.passes import (
    CalibrationRunner,
    LinearNode,
    allocate_by_sensitivity,
    allocate_closed_form,
    allocate_uniform,
    build_plan,
    calibrate,
    collect_stats,
    decompose,
    dense_weight,
    factorize_linears,
    find_linears,
    insert_observers,
    measure_sensitivity,
    release_dense_weights,
)
from lrcompile.passes.calibration_runner import is_state_input
from lrcompile.passes.decomposition import LinearDecomposition
from lrcompile.passes.find_linears import placeholder_values, weight_tensor
from lrcompile.runtime.compressed_layers import record_layer, recorded_layer

from .config import LowRankConfig
from .errors import CalibrationError, NoCompressibleLinearError
from .pass_manager import Pass, PassManager
from .report import CompressionReport, build_report
from .types import CompressionPlan, CompressedLayer, LayerPlan, LayerStatus

log = logging.getLogger(__name__)

_graph_ids = itertools.count()


@dataclass
class GraphCompression:
    """Everything the passes learned and changed on one graph."""

    gm: fx.GraphModule
    example_inputs: list[Any]
    config: LowRankConfig
    linears: list[LinearNode] = field(default_factory=list)
    recorded: dict[LinearNode, CompressedLayer] = field(default_factory=dict)
    plan: CompressionPlan | None = None
    layers: dict[LinearNode, CompressedLayer] = field(default_factory=dict)
    kept_inputs: list[int] | None = None
    instance_input: tuple[int, str, torch.Tensor] | None = None  # (kept input index, source, tensor)
    runner: CalibrationRunner | None = None
    report: CompressionReport | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_compress(self) -> list[LinearNode]:
        """Compressible linears with no recorded outcome: these need calibration and planning."""
        return [v for v in self.linears if v.meta.compressible and v not in self.recorded]

    def weight(self, view: LinearNode) -> torch.Tensor:
        return weight_tensor(self.gm, view, placeholder_values(self.gm, self.example_inputs))


def _find_linears(c: GraphCompression) -> None:
    c.linears = find_linears(c.gm, c.example_inputs, c.config.include, c.config.exclude)
    for view in c.linears:
        if not view.meta.compressible:
            continue
        weight = c.weight(view)
        layer = recorded_layer(weight)
        if layer is not None:
            c.recorded[view] = layer
        elif weight.untyped_storage().nbytes() == 0:
            raise CalibrationError(
                f"layer {view.meta.name!r}: its dense weight was released but no factors are recorded for it"
            )
    has_parameters = any(n.op in ("get_attr", "call_module") or is_state_input(n) for n in c.gm.graph.nodes)
    if not any(v.meta.compressible for v in c.linears) and (c.linears or has_parameters):
        found = "; ".join(f"{v.meta.name}: {v.meta.skip_reason}" for v in c.linears) or "none"
        raise NoCompressibleLinearError(
            f"the captured graph has no compressible linear layer (linears found: {found}); "
            f"include={list(c.config.include)}, exclude={list(c.config.exclude)}"
        )


def _apply_recorded(c: GraphCompression) -> None:
    """Rewrite layers compressed earlier (a recompile, another graph, a loaded plan) without recalibrating."""
    factored = {v: layer for v, layer in c.recorded.items() if layer.status is LayerStatus.FACTORED}
    if factored:
        factorize_linears(c.gm, factored)
        log.info("reused %d recorded factored layers", len(factored))


def _activation_stats(c: GraphCompression) -> None:
    targets = c.to_compress()
    if not targets or not c.config.needs_calibration:
        return
    if c.config.calibration is None:
        raise CalibrationError(
            f"option 'calibration' is required for method={c.config.method!r}, allocation={c.config.allocation!r}: "
            "pass an iterable of model inputs (only method='svd' with allocation='uniform' needs none)"
        )
    c.runner = CalibrationRunner(c.gm, c.example_inputs)
    if c.config.method == "svd":
        return
    insert_observers(c.gm, targets, gram=c.config.method == "whiten")
    try:
        calibrate(c.runner, c.config.calibration, total=len(c.config.calibration))
    except BaseException:
        collect_stats(c.gm, targets, validate=False)  # leave the graph clean; report the real error
        raise
    collect_stats(c.gm, targets)


def _decompose(c: GraphCompression, view: LinearNode) -> LinearDecomposition:
    """One layer's float64 SVD, recomputed by each pass that needs it: holding every
    layer's decomposition at once would cost several times the model's own memory."""
    weight = dense_weight(c.gm, view, placeholder_values(c.gm, c.example_inputs))
    return decompose(weight, c.config.method, view.meta.stats, c.config.alpha, view.meta.name)


def _sensitivity(c: GraphCompression) -> None:
    targets = c.to_compress()
    if not targets or c.config.allocation != "sensitivity" or not c.config.needs_calibration:
        return
    batches = c.config.calibration[: c.config.sensitivity_batches]
    measure_sensitivity(c.runner, targets, lambda v: _decompose(c, v), c.config.sensitivity_ratios, batches, c.config.rank_multiple)


def _allocate_ranks(c: GraphCompression) -> None:
    targets = c.to_compress()
    metas = [v.meta for v in targets]
    cfg = c.config
    if not targets:
        layers: list[LayerPlan] = []
    elif cfg.allocation == "uniform" or cfg.param_ratio >= 1.0:  # at ratio 1 every layer stays dense
        layers = allocate_uniform(metas, cfg.param_ratio, cfg.rank_multiple)
    elif cfg.allocation == "sensitivity":
        layers = allocate_by_sensitivity(metas, cfg.param_ratio, cfg.rank_multiple)
    else:
        spectra = {v.meta.name: _decompose(c, v).s for v in targets}
        layers = allocate_closed_form(metas, spectra, cfg.param_ratio, cfg.rank_multiple)
    c.plan = build_plan(cfg.method, cfg.allocation, cfg.param_ratio, layers)


def _factorize(c: GraphCompression) -> None:
    targets = c.to_compress()
    factored = {}
    for view, layer_plan in zip(targets, c.plan.layers):
        weight = c.weight(view)
        layer = CompressedLayer(layer_plan, c.config.method, LayerStatus.DENSE, weight.dtype, dense_bytes=weight.untyped_storage().nbytes())
        if layer_plan.rank is not None:
            decomposition = _decompose(c, view)
            down, up = decomposition.factors(layer_plan.rank, view.meta.weight_dtype)
            layer.plan = replace(layer_plan, truncation_loss=decomposition.truncation_loss(layer_plan.rank))
            layer.down, layer.up, layer.status = down.to(weight.device), up.to(weight.device), LayerStatus.FACTORED
            factored[view] = layer
        c.layers[view] = layer
        record_layer(weight, layer)
    for view in c.linears:
        if not view.meta.compressible:
            meta = view.meta
            skipped = LayerPlan(meta.name, meta.out_features, meta.in_features, None, meta.skip_reason)
            c.layers[view] = CompressedLayer(skipped, "", LayerStatus.SKIPPED, meta.weight_dtype)
            record_layer(c.weight(view), c.layers[view])
    c.layers.update(c.recorded)
    factorize_linears(c.gm, factored)


def _release_dense(c: GraphCompression) -> None:
    factored = [v for v, layer in c.layers.items() if layer.status is LayerStatus.FACTORED]
    if c.config.release_dense and factored:
        _, c.kept_inputs = release_dense_weights(c.gm, factored, c.example_inputs)
    if any(layer.status is LayerStatus.FACTORED for layer in c.layers.values()):
        c.instance_input = _instance_input(c)


def _instance_input(c: GraphCompression) -> tuple[int, str, torch.Tensor] | None:
    """A model-state input that identifies the model instance the factors belong to.

    Dynamo reuses a graph for another instance of the same class when the
    backends compare equal (same options object, or equal option dicts); that
    graph would then run with the first instance's factors.
    """
    kept = c.kept_inputs if c.kept_inputs is not None else range(len(c.example_inputs))
    placeholders = [n for n in c.gm.graph.nodes if n.op == "placeholder"]
    for position, (node, index) in enumerate(zip(placeholders, kept)):
        if is_state_input(node) and isinstance(c.example_inputs[index], torch.Tensor):
            return position, node.meta["grapharg"].source.name, c.example_inputs[index]
    return None


PASSES: tuple[Pass[GraphCompression], ...] = (
    Pass("find_linears", _find_linears, provides=frozenset({"linears"})),
    Pass("apply_recorded", _apply_recorded, frozenset({"linears"}), frozenset({"recorded"})),
    Pass("activation_stats", _activation_stats, frozenset({"recorded"}), frozenset({"stats"})),
    Pass("sensitivity", _sensitivity, frozenset({"stats"}), frozenset({"sensitivity"})),
    Pass("allocate_ranks", _allocate_ranks, frozenset({"stats", "sensitivity"}), frozenset({"plan"})),
    Pass("factorize_linears", _factorize, frozenset({"plan"}), frozenset({"factored"})),
    Pass("release_dense", _release_dense, frozenset({"factored"}), frozenset({"released"})),
)


def compress_graph(gm: fx.GraphModule, example_inputs: list[Any] | None, config: LowRankConfig) -> GraphCompression:
    """Run every pass on ``gm``; the result holds the rewritten graph, the plan and the report."""
    graph_id = next(_graph_ids)
    dump_dir = Path(config.dump_dir) / f"graph_{graph_id:03d}" if config.dump_dir else None
    compression = GraphCompression(gm, list(example_inputs or []), config)
    manager = PassManager(PASSES, dump_dir)
    manager.run(compression, lambda c: c.gm)
    compression.timings = manager.timings
    compression.report = build_report(
        [compression.layers[v] for v in compression.linears if v in compression.layers], config.to_json(), manager.timings
    )
    compression.report.log()
    if dump_dir is not None:
        if compression.plan is not None:
            (dump_dir / "plan.json").write_text(json.dumps(plan_to_json(compression.plan), indent=2))
        compression.report.save(dump_dir)
    return compression


def plan_to_json(plan: CompressionPlan) -> dict[str, Any]:
    return {
        "method": plan.method,
        "allocation": plan.allocation,
        "param_ratio": plan.param_ratio,
        "achieved_ratio": plan.achieved_ratio,
        "layers": [
            {"name": p.name, "out_features": p.out_features, "in_features": p.in_features, "rank": p.rank, "reason": p.reason}
            for p in plan.layers
        ],
    }
