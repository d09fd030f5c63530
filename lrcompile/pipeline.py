"""The compression pipeline on one captured graph: find, reuse, observe, plan, factor, quantise, release.

The outcome goes on the model: the passes build the modules that replace its
linears (:mod:`lrcompile.modules`) and the rewritten graph reads their factors;
:func:`install` puts them in place. A later graph of the same
model finds those modules and reuses them without calibration.
"""

from __future__ import annotations

import itertools
import json
import math
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

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
from lrcompile.passes.additive_quantization import check_shape
from lrcompile.passes.attention_blocks import AttentionBlock, UnmatchedAttention, find_attention_blocks
from lrcompile.passes.calibration_runner import is_state_input
from lrcompile.passes.decomposition import LinearDecomposition, Whitening, check_finite_weight, shared_whitening
from lrcompile.passes.find_linears import (
    EMBEDDING_LOOKUPS,
    CapturedFrame,
    ModuleSlot,
    captured_frame,
    node_constant,
    parameter_owner,
    attribute_reads,
    placeholder_values,
    replacement_breaks,
    unrecognised_linears,
    unrecognised_weights,
    weight_owner,
    weight_tensor,
)
from lrcompile.passes.kv_fisher import measure_kv_fisher
from lrcompile.passes.kv_metrics import KVMetric, kv_metric
from lrcompile.passes.kv_rank_allocation import (
    KVProjection,
    allocate_kv_closed_form,
    allocate_kv_fisher,
    allocate_kv_sensitivity,
    allocate_kv_uniform,
)
from lrcompile.passes.kv_sensitivity import measure_kv_sensitivity
from lrcompile.passes.quantize_linears import (
    AQSettings,
    aq_would_not_save,
    is_aq_call,
    quantize_dense,
    quantize_factors,
    quantize_linears,
)
from lrcompile.passes.rank_allocation import energy_share
from lrcompile.passes.sequential_calibration import FeedbackStep, sequential_steps
from lrcompile.passes.latent_kv import (
    block_weights,
    build_latent_attention,
    check_group_size,
    group_decompositions,
    restructure_attention,
)

from .config import LowRankConfig
from .errors import (CalibrationError, GraphBreakError, LatentCacheError, LowRankConfigError, LowRankError,
                     NoCompressibleLinearError)
from .hf_quantizer import describe_on_config
from .modules import (
    LEFT_DENSE,
    RECORD,
    SKIPPED_PARAMETER,
    AQLinear,
    AQLowRankLinear,
    GroupedLowRankProjection,
    LowRankLinear,
    factor_bytes,
    module_record,
)
from .pass_manager import Pass, PassManager
from .report import CompressionReport, build_report
from .runtime.compiled_forward import check_calibration_batches, warn_thin_calibration
from .types import CompressionPlan, CompressedLayer, LatentAttention, LayerPlan, LayerStatus

log = logging.getLogger(__name__)

RESHAPES = (torch.reshape, torch.ops.aten.view.default, torch.ops.aten.reshape.default)


@dataclass
class GraphCompression:
    """Everything the passes learned and changed on one graph, and the modules to put on the model."""

    gm: fx.GraphModule
    example_inputs: list[Any]
    config: LowRankConfig
    frame: CapturedFrame | None = None  # Dynamo's frame: its locals hold the model's modules
    linears: list[LinearNode] = field(default_factory=list)
    owners: dict[LinearNode, ModuleSlot] = field(default_factory=dict)
    latent_projections: set[LinearNode] = field(default_factory=set)  # down linears of grouped K/V on the model
    recorded: dict[LinearNode, CompressedLayer] = field(default_factory=dict)
    plan: CompressionPlan | None = None
    layers: dict[LinearNode, CompressedLayer] = field(default_factory=dict)
    rewritten: dict[LinearNode, nn.Module] = field(default_factory=dict)  # new module of each layer the graph will read
    kept_inputs: list[int] | None = None
    instance_input: tuple[int, str, torch.Tensor] | None = None  # (kept input index, source, tensor)
    runner: CalibrationRunner | None = None
    batches: list[Any] = field(default_factory=list)  # calibration batches as the graph runs them
    blocks: list[tuple[AttentionBlock, LatentAttention | None]] = field(default_factory=list)  # None: to plan
    unmatched_attention: list[UnmatchedAttention] = field(default_factory=list)
    kv_metrics: dict[str, KVMetric] = field(default_factory=dict)  # by block name
    kv_fisher: dict[str, float] = field(default_factory=dict)
    kv_sensitivity: dict[str, dict[float, float]] = field(default_factory=dict)
    latent: list[LatentAttention] = field(default_factory=list)
    replacements: list[tuple[ModuleSlot, nn.Module]] = field(default_factory=list)  # new modules for the model
    records: list[tuple[nn.Module, CompressedLayer]] = field(default_factory=list)  # records for linears kept dense
    report: CompressionReport | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def frame_locals(self) -> Mapping[str, Any] | None:
        return None if self.frame is None else self.frame.locals

    @property
    def after_graph_break(self) -> bool:
        return self.frame is not None and self.frame.after_graph_break

    def to_compress(self) -> list[LinearNode]:
        """Compressible linears with no recorded outcome: these need calibration and planning."""
        members = {view for block, _ in self.blocks for view in (block.k_linear, block.v_linear, block.o_linear)}
        return [v for v in self.linears if v.meta.compressible and v not in self.recorded and v not in members]

    def new_blocks(self) -> list[AttentionBlock]:
        """Attention blocks to restructure that have no recorded outcome."""
        return [block for block, layer in self.blocks if layer is None]

    def weight(self, view: LinearNode) -> torch.Tensor:
        return weight_tensor(self.gm, view, placeholder_values(self.gm, self.example_inputs))



def install(replacements: list[tuple[ModuleSlot, nn.Module]], records: list[tuple[nn.Module, CompressedLayer]],
            models: list[nn.Module]) -> None:
    """Put a graph's outcome on the model: swap in the new modules (the dense weights go with the old
    ones), give the linears kept dense their records, and describe them on the model's config."""
    for slot, module in replacements:
        slot.replace(module)
    for module, record in records:
        setattr(module, RECORD, record)
    for model in models:
        describe_on_config(model)
    log.info("installed %d compressed modules on the model", len(replacements))


def _reusable(c: GraphCompression, name: str, options: Mapping[str, Any] | None, dense_held: bool) -> bool:
    """Whether a recorded outcome holds under this compile's options.

    Recorded under other options: compress again while the dense weight is
    still held (a layer planned dense; the caller says so once every layer
    is checked), else there is nothing to compress from. A loaded model
    (``options`` None) is used as saved, and so is any model under a config
    that asks for nothing (no calibration, every deciding option at its
    default: a compile only to run the model, as ``LatentKVCache`` needs).
    """
    wanted = c.config.deciding_options()
    asks_nothing = c.config.calibration is None and wanted == LowRankConfig().deciding_options()
    if options is None or options == wanted or asks_nothing:
        return True
    changed = sorted(key for key in wanted if options.get(key) != wanted[key])
    before = ", ".join(f"{key}={options.get(key)!r}" for key in changed)
    after = ", ".join(f"{key}={wanted[key]!r}" for key in changed)
    if dense_held:
        return False
    raise LowRankError(
        f"layer {name!r} was compressed with {before} and its dense weights were replaced by factors; this compile asks "
        f"for {after} (other options equal). Load a fresh copy of the model (from_pretrained) to compress it with "
        "new options, or compile with the options it was compressed with."
    )


def _find_linears(c: GraphCompression) -> None:
    """Find the linears and their modules; those the model holds compressed already are reused as they are."""
    c.linears = find_linears(c.gm, c.example_inputs, c.config.include, c.config.exclude)
    installed_aq, held = _check_installed_aq(c), set()  # the compressed modules found (a factor pair is two linears)
    values = placeholder_values(c.gm, c.example_inputs)
    reads: dict[int, str] | None = None  # parameters that generated code reads by attribute, from the first owner
    breaking: dict[str, list[str]] = {}  # layers that cannot be replaced on the model, by reason
    again: list[str] = []  # layers planned dense under other options, compressed again
    for view in c.linears:
        slot = weight_owner(c.gm, view, c.frame_locals)
        module = None if slot is None else slot.module
        record = module_record(module)
        if isinstance(module, (LowRankLinear, GroupedLowRankProjection)):
            _reusable(c, view.meta.name, record.options, dense_held=False)
            view.meta.compressible, view.meta.skip_reason = False, f"compressed already ({type(module).__name__})"
            if isinstance(module, LowRankLinear):
                c.recorded[view] = record
            else:
                c.latent_projections.add(view)
            held.add(id(module))
            continue
        if not view.meta.compressible:
            continue
        if slot is None:
            view.meta.compressible, view.meta.skip_reason = False, (
                "its weight is not a parameter of one of the model's submodules (a parameter of the model itself, "
                "or a tensor the graph computes): lrcompile compresses a layer by replacing its submodule")
            weight = None if view.weight is None else node_constant(c.gm, view.weight, values)
            if isinstance(weight, nn.Parameter):  # no module to carry a record: the parameter says it was warned
                if getattr(weight, SKIPPED_PARAMETER, None) == view.meta.skip_reason:
                    continue
                setattr(weight, SKIPPED_PARAMETER, view.meta.skip_reason)
            breaking.setdefault(view.meta.skip_reason, []).append(
                f"{view.meta.name} [{view.meta.out_features} x {view.meta.in_features}]")
            continue
        if reads is None:
            reads = attribute_reads(slot.root, c.gm)
        broken = replacement_breaks(view, slot, c.frame is not None, reads)
        if broken:
            view.meta.compressible, view.meta.skip_reason = False, broken
            if record is None:  # else an earlier compile of the model said so
                breaking.setdefault(broken, []).append(view.meta.name)
            continue
        c.owners[view] = slot
        if record is not None and _reusable(c, view.meta.name, record.options, dense_held=True):
            c.recorded[view] = record
            view.meta.plan = record.plan  # for graph dumps: the decision an earlier compile made
        elif record is not None:
            again.append(view.meta.name)
    if again:  # only now: a layer compressed already under other options refuses the compile above
        log.warning("%d layer(s) kept dense by an earlier compile with other options are compressed again with "
                    "this compile's options: %s%s", len(again), ", ".join(again[:4]), ", ..." * (len(again) > 4))
    for reason, names in breaking.items():
        log.warning("%d layer(s) stay dense: %s: %s%s", len(names), reason, ", ".join(names[:4]),
                    ", ..." * (len(names) > 4))
    _refuse_graph_break(c)
    unknown = unrecognised_linears(c.gm, c.linears, c.frame_locals)
    unknown_reason = "its weight is read by an op other than a linear (an einsum, say)"
    unknown_text = (f"{len(unknown)} nn.Linear module(s) use their weight in an op other than a linear (an einsum, "
                    f"say) and stay dense: {', '.join(list(unknown)[:4])}{', ...' * (len(unknown) > 4)}")
    unsaid = {path: module for path, module in unknown.items() if module_record(module) is None}
    c.records += [_skipped_record(c, path, module, unknown_reason) for path, module in unsaid.items()]
    if held:
        log.info("%d module(s) of the linears found are compressed already (the model holds their outcome)", len(held))
    nothing = not installed_aq and not held and not any(v.meta.compressible for v in c.linears)
    if not c.linears and not unknown:  # a graph-break fragment (embeddings, mask building) or a model without linears
        log.warning("a captured graph has no linear layer: nothing to compress in it")
    elif nothing and c.after_graph_break:  # e.g. only the lm_head, which the defaults exclude
        log.warning("graph %r after a graph break has no compressible linear layer: nothing to compress in it",
                    c.frame.name)
    elif nothing:
        shown = 6
        found = "; ".join(f"{v.meta.name}: {v.meta.skip_reason}" for v in c.linears[:shown])
        if len(c.linears) > shown:
            found += f"; and {len(c.linears) - shown} more"
        raise NoCompressibleLinearError(
            f"the captured graph has no compressible linear layer (linears found: {found or 'none'}"
            f"{'; ' + unknown_text if unknown else ''}); include={list(c.config.include)}, exclude={list(c.config.exclude)}"
        )
    if unsaid and not nothing:
        log.warning("%s", unknown_text)
    _warn_unrecognised_weights(c, unknown, values)


def _warn_unrecognised_weights(c: GraphCompression, unknown_modules: Mapping[str, nn.Linear],
                               values: Mapping[fx.Node, Any]) -> None:
    """Name the large weights no recognised linear reads (MoE experts stacked in 3-D tensors): they stay dense
    whatever the budget, which the linears' totals would not show; ``values``: the graph's placeholder values."""
    weights = unrecognised_weights(c.gm, c.linears, values, unknown_modules)
    if not weights:
        return
    parameters = {id(v): v.numel() for n, v in values.items() if isinstance(v, torch.Tensor) and
                  n.meta.get("grapharg") is not None and "._parameters[" in n.meta["grapharg"].source.name}
    held = sum(math.prod(w.shape) for w in weights)
    log.warning("%d weight tensor(s) holding %d parameters (%.0f%% of the graph's) are read by ops lrcompile does not "
                "factor and stay dense (e.g. MoE experts stacked in one tensor): %s%s", len(weights), held,
                100 * held / max(sum(parameters.values()), 1), "; ".join(w.describe() for w in weights[:4]),
                f"; and {len(weights) - 4} more" if len(weights) > 4 else "")


def _refuse_graph_break(c: GraphCompression) -> None:
    """A graph Dynamo starts after a graph break cannot be compressed: it takes the model's intermediate values
    (calibration batches give the model's inputs, not these), runs in a submodule's frame (its layers have no
    path from the model's root, by which they are saved) and Dynamo reuses it for every layer whose code resumes
    there. Layers to compress there are an error; a fragment holding only layers left alone (the output head)
    passes."""
    asked = c.config.param_ratio < 1.0 or c.config.quantize is not None or c.config.kv_ratio is not None
    pending = [v.meta.name for v in c.linears if v in c.owners and v not in c.recorded]
    if not (c.after_graph_break and asked and pending):
        return
    owner = c.frame.locals.get("self")
    attention = getattr(getattr(owner, "config", None), "_attn_implementation", None)
    hint = (f" (this model runs attn_implementation={attention!r}, whose masks break the graph: load it with "
            "attn_implementation='sdpa')" if attention not in (None, "sdpa", "eager") else "")
    raise GraphBreakError(
        f"a graph break splits the compiled model: Dynamo's frame {c.frame.name!r} ({c.frame.location}) starts after "
        f"it and holds {len(pending)} linear(s) to compress ({', '.join(pending[:4])}{', ...' * (len(pending) > 4)}, "
        f"named within that frame), which lrcompile cannot reach from the model's inputs{hint}. Remove the break "
        "(compile with fullgraph=True to see where it is, or torch._dynamo.explain(model)(*inputs)) and load the model "
        "again: layers before the break may be compressed already"
    )


def _check_installed_aq(c: GraphCompression) -> bool:
    """Whether the graph runs AQ layers installed already (a quantised model compiled again); each must have
    been quantised under this compile's options, as a factored layer must (:func:`_reusable`)."""
    calls = [node for node in c.gm.graph.nodes if is_aq_call(node)]
    for node in calls:
        slot = parameter_owner(c.gm, node.args[1], c.frame_locals)  # the codes' module
        if slot is None:
            continue
        record = module_record(slot.module) or module_record(slot.parent)  # a factor's record is its pair's
        if isinstance(record, CompressedLayer):
            _reusable(c, record.name, record.options, dense_held=False)
    return bool(calls)


def _find_attention(c: GraphCompression) -> None:
    """Recognise attention blocks; those to restructure take their K/V/output projections out of weight factoring.

    A block whose K and V are grouped projections was restructured earlier: its record comes from them.
    """
    blocks, c.unmatched_attention = find_attention_blocks(c.gm, c.linears)
    restructured = bool(c.latent_projections)  # a call without a latent cache attends over K/V rebuilt from them
    if c.config.kv_ratio is not None and not blocks and not c.unmatched_attention and c.owners and not restructured:
        log.warning("kv_ratio=%s: the captured graph has linears but no attention block, so no KV cache to "
                    "compress in it (a model without attention, or attention in another graph after a graph break)",
                    c.config.kv_ratio)
    for block in blocks:
        if block.restructured:
            c.blocks.append((block, module_record(weight_owner(c.gm, block.k_linear.latent, c.frame_locals).module)))
            for role, projection in (("K", block.k_linear), ("V", block.v_linear)):
                projection.latent.meta.attention_role = f"latent {role} of {block.name}, restructured already"
            continue
        if c.config.kv_ratio is None:
            if block.marker is not None:
                raise LatentCacheError(
                    f"{block.name} writes a latent KV cache, but the model has no latent-KV plan: compress it with "
                    "a kv_ratio option first"
                )
            continue
        if any(view not in c.owners for view in (block.k_linear, block.v_linear)):
            c.unmatched_attention.append(UnmatchedAttention(block.name, "its K/V weights are not module parameters"))
            continue
        c.blocks.append((block, None))
        for role, view in (("K", block.k_linear), ("V", block.v_linear)):
            view.meta.attention_role = f"{role} projection of {block.name}, to restructure for a latent KV cache"
    stray = [u for u in c.unmatched_attention if u.cache_marker]
    if stray:
        raise LatentCacheError(f"latent KV cache used by attention that was not restructured: {stray[0].name} ({stray[0].reason})")
    if c.config.kv_ratio is not None and c.unmatched_attention:
        message = (f"kv_ratio={c.config.kv_ratio}: {len(c.unmatched_attention)} attention block(s) cannot be "
                   "restructured for a latent KV cache and would stay dense: "
                   + "; ".join(f"{u.name}: {u.reason}" for u in c.unmatched_attention))
        if c.config.kv_unmatched == "error":
            raise LatentCacheError(message + " (option kv_unmatched='warn', on the command line --kv-unmatched warn, "
                                   "compresses the rest and leaves these dense)")
        root = next((slot.root for slot in c.owners.values()), None)
        modules = dict(root.named_modules()) if root is not None else {}
        if any(not hasattr(modules.get(u.name), LEFT_DENSE) for u in c.unmatched_attention):  # once, not per recompile
            log.warning("%s", message)
        for u in c.unmatched_attention:  # on the model, for its report
            if u.name in modules:
                setattr(modules[u.name], LEFT_DENSE, u.reason)


def _observes_weights(config: LowRankConfig) -> bool:
    """Whether weight factoring reads statistics observed on the dense model for every layer at once.

    Sequential calibration observes each input during its own step instead
    (closed_form's spectra in a dense step-by-step pass), unless sensitivity
    trials need every layer's statistics at once."""
    return config.calibration_order == "independent" or config.allocation == "sensitivity"


def _activation_stats(c: GraphCompression) -> None:
    targets = c.to_compress() if c.config.needs_calibration else []
    kv_targets = [b.k_linear for b in c.new_blocks()] if c.config.kv_needs_calibration else []
    if not targets and not kv_targets:
        return
    if c.config.calibration is None:
        raise CalibrationError(
            f"option 'calibration' is required for method={c.config.method!r}, allocation={c.config.allocation!r}, "
            f"kv_allocation={c.config.kv_allocation!r}: pass an iterable of model inputs (only method='svd' with "
            "allocation='uniform' and kv_allocation='uniform' needs none)"
        )
    kv_linears = [view for block in c.new_blocks() for view in (block.k_linear, block.v_linear)] if kv_targets else []
    for view in targets + kv_linears:  # before calibration: a NaN weight would surface as NaN activations further on
        check_finite_weight(c.weight(view), view.meta.name)
    for view in targets if c.config.aq_spec is not None else ():  # a group size the layers refuse, before calibrating
        check_shape(c.config.aq_spec, view.meta.out_features, view.meta.in_features, view.meta.name)
    check_calibration_batches(c.config.calibration, None)  # text or meta tensors, before the runner binds them
    c.runner = CalibrationRunner(c.gm, c.example_inputs, None if c.frame is None else c.frame.args_callee)
    c.batches = c.runner.fit(c.config.calibration)
    check_calibration_batches(c.batches, _vocabulary_size(c))
    fit_to_gram = targets + kv_targets if c.config.method == "whiten" else targets if c.config.quantize else []
    if fit_to_gram:
        widest = max(fit_to_gram, key=lambda v: v.meta.in_features).meta
        warn_thin_calibration(c.batches, widest.in_features, widest.name)
    targets = (targets if _observes_weights(c.config) else []) + kv_targets
    if (c.config.method == "svd" and c.config.quantize is None) or not targets:
        return
    insert_observers(c.gm, targets, gram=c.config.method == "whiten" or c.config.quantize is not None)
    try:
        calibrate(c.runner, c.batches, total=len(c.batches))
    except BaseException:
        collect_stats(c.gm, targets, validate=False)  # leave the graph clean; report the real error
        raise
    collect_stats(c.gm, targets)


def _vocabulary_size(c: GraphCompression) -> int | None:
    """Rows of the embedding table the token ids (the runner's primary input) index; None without such a lookup."""
    primary, values = c.runner.primary, placeholder_values(c.gm, c.example_inputs)
    for node in c.gm.graph.nodes:
        if primary is not None and node.op == "call_function" and node.target in EMBEDDING_LOOKUPS:
            table, ids = node.args[:2] if node.target is torch.ops.aten.embedding.default else node.args[1::-1]
            weight = node_constant(c.gm, table, values) if isinstance(table, fx.Node) else None
            while isinstance(ids, fx.Node) and (ids.target in RESHAPES or ids.op == "call_method" and ids.target in
                                                ("view", "reshape", "contiguous")):  # OPT flattens the ids first
                ids = ids.args[0]
            if isinstance(ids, fx.Node) and c.runner.inputs.get(ids) == primary and isinstance(weight, torch.Tensor):
                return weight.shape[0]
    return None


def _decompose(c: GraphCompression, view: LinearNode) -> LinearDecomposition:
    """One layer's float64 SVD, recomputed by each pass that needs it: holding every
    layer's decomposition at once would cost several times the model's own memory."""
    weight = dense_weight(c.gm, view, placeholder_values(c.gm, c.example_inputs))
    return decompose(weight, c.config.method, view.meta.stats, c.config.alpha, view.meta.name)


def _kv_metrics(c: GraphCompression) -> None:
    """Each new block's :class:`KVMetric` (method ``whiten``): K's errors weighted by the scores, V's by the
    output projection. A block whose q reads another input than k (q already factored) keeps plain whitening."""
    if c.config.method != "whiten" or not c.config.kv_needs_calibration or not c.new_blocks():
        return
    values = placeholder_values(c.gm, c.example_inputs)
    calibrated = c.runner.sequence_length(c.batches)
    for block in c.new_blocks():
        stats = block.k_linear.meta.stats
        inv_freq = node_constant(c.gm, block.inv_freq, values)
        positions = block.positions.meta.get("example_value", block.positions.meta.get("val"))
        length = calibrated or (positions.shape[-1] if isinstance(positions, torch.Tensor) else None)
        if block.q_linear.input is not block.k_linear.input or not isinstance(block.q_linear, LinearNode) \
                or stats is None or stats.gram is None or not isinstance(inv_freq, torch.Tensor) or not length:
            log.info("%s: K/V factored in the whitened metric alone (q reads another input, or no RoPE table)",
                     block.name)
            continue
        c.kv_metrics[block.name] = kv_metric(dense_weight(c.gm, block.q_linear, values),
                                             dense_weight(c.gm, block.o_linear, values), stats.gram,
                                             block.num_heads, block.num_kv_heads, inv_freq, length)
    log.info("K/V errors weighed by the attention scores and o_proj in %d of %d blocks", len(c.kv_metrics),
             len(c.new_blocks()))


def _group_metrics(c: GraphCompression, block: AttentionBlock, view: LinearNode) -> list[torch.Tensor] | None:
    """The output metric of each head group of ``view``, K or V of ``block`` (None: plain whitening)."""
    metric = c.kv_metrics.get(block.name)
    if metric is None:
        return None
    return metric.group("k" if view is block.k_linear else "v", block.num_kv_heads // _kv_group_size(c, block))


def _kv_fisher(c: GraphCompression) -> None:
    blocks = c.new_blocks()
    if not blocks or c.config.kv_allocation != "fisher" or not c.config.kv_needs_calibration:
        return
    views = [view for b in blocks for view in (b.k_linear, b.v_linear)]
    c.kv_fisher = measure_kv_fisher(c.runner, views, [c.weight(v) for v in views], c.batches)


def _kv_group_size(c: GraphCompression, block: AttentionBlock) -> int:
    group = block.num_kv_heads if c.config.kv_group_size == "all" else c.config.kv_group_size
    check_group_size(group, block.num_kv_heads, block.name)
    return group


def _kv_sensitivity(c: GraphCompression) -> None:
    blocks = c.new_blocks()
    if not blocks or c.config.kv_allocation != "sensitivity" or not c.config.kv_needs_calibration:
        return
    block_of = {view: block for block in blocks for view in (block.k_linear, block.v_linear)}
    values = placeholder_values(c.gm, c.example_inputs)

    def decompose_groups(view: LinearNode) -> list[LinearDecomposition]:
        block = block_of[view]  # K and V read the same input: its statistics are on the K projection
        groups = block.num_kv_heads // _kv_group_size(c, block)
        return group_decompositions(weight_tensor(c.gm, view, values), groups, c.config.method,
                                    block.k_linear.meta.stats, c.config.alpha, view.meta.name,
                                    _group_metrics(c, block, view))

    batches = c.batches[: c.config.sensitivity_batches]
    c.kv_sensitivity = measure_kv_sensitivity(c.runner, list(block_of), decompose_groups, c.config.sensitivity_ratios,
                                              batches, c.config.rank_multiple)


def _sensitivity(c: GraphCompression) -> None:
    targets = c.to_compress()
    if not targets or c.config.allocation != "sensitivity" or not c.config.needs_calibration or c.config.param_ratio >= 1:
        return
    batches = c.batches[: c.config.sensitivity_batches]
    measure_sensitivity(c.runner, targets, lambda v: _decompose(c, v), c.config.sensitivity_ratios, batches,
                        c.config.weight_rank_multiple)


def _allocate_ranks(c: GraphCompression) -> None:
    targets = c.to_compress()
    metas = [v.meta for v in targets]
    cfg = c.config
    if not targets:
        layers: list[LayerPlan] = []
    elif cfg.allocation == "uniform" or cfg.param_ratio >= 1.0:  # at ratio 1 every layer stays dense
        layers = allocate_uniform(metas, cfg.param_ratio, cfg.weight_rank_multiple)
    elif cfg.allocation == "sensitivity":
        layers = allocate_by_sensitivity(metas, cfg.param_ratio, cfg.weight_rank_multiple)
    else:
        layers = allocate_closed_form(metas, _spectra(c, targets), cfg.param_ratio, cfg.weight_rank_multiple)
    c.plan = build_plan(cfg.method, cfg.allocation, cfg.param_ratio, layers, cfg.weight_rank_multiple)
    for view, layer in zip(targets, c.plan.layers):
        view.meta.plan = layer  # for graph dumps: the decision beside what it was made from


def _spectra(c: GraphCompression, targets: list[LinearNode]) -> dict[str, torch.Tensor]:
    """Singular values of each layer's scaled weight (closed_form allocation), from the dense model's statistics."""
    if _observes_weights(c.config):
        return {v.meta.name: _decompose(c, v).s for v in targets}
    values = placeholder_values(c.gm, c.example_inputs)
    spectra = {}
    for step in sequential_steps(c.runner, c.batches, targets, compressed=False):
        whitening = _whitening(c, step)
        for view in step.linears:
            spectra[view.meta.name] = decompose(dense_weight(c.gm, view, values), c.config.method, step.stats,
                                                c.config.alpha, view.meta.name, whitening).s
    return spectra


def _whitening(c: GraphCompression, step: FeedbackStep) -> Whitening | None:
    """The step's input transform, shared by its linears (None unless the method whitens); consumes ``step.cross``."""
    cross, step.cross = step.cross, None
    return shared_whitening(c.config.method, step.stats, step.linears[0].meta.name, cross)


def _factorize(c: GraphCompression) -> None:
    """Factor each planned layer into a new ``LowRankLinear`` (the graph is rewritten to read it by ``rewrite_linears``)."""
    targets = c.to_compress()
    plans = dict(zip(targets, c.plan.layers))
    refit: dict[LinearNode, tuple[torch.Tensor, torch.Tensor, float]] = {}  # factors and loss from the sequential pass
    if c.config.calibration_order != "independent" and any(p.rank is not None for p in plans.values()):
        values = placeholder_values(c.gm, c.example_inputs)
        planned = [view for view in targets if plans[view].rank is not None]
        for step in sequential_steps(c.runner, c.batches, planned, cross=c.config.calibration_order == "error_feedback"):
            whitening = _whitening(c, step)
            for view in step.linears:
                view.meta.refit_rows = step.stats.rows  # for graph dumps: the statistics are not kept
                refit[view] = _factors(decompose(dense_weight(c.gm, view, values), c.config.method, step.stats,
                                                 c.config.alpha, view.meta.name, whitening),
                                       plans[view].rank, view)
                step.factors[view] = refit[view][:2]
    for view, layer_plan in plans.items():
        weight = c.weight(view)
        slot = c.owners[view]
        layer = CompressedLayer(layer_plan, c.config.method, LayerStatus.DENSE, weight.dtype,
                                dense_bytes=weight.untyped_storage().nbytes(), options=c.config.deciding_options())
        if layer_plan.rank is None:
            c.records.append((slot.module, layer))
        else:
            down, up, loss = refit.pop(view) if view in refit else _factors(_decompose(c, view), layer_plan.rank, view)
            layer.plan = replace(layer_plan, truncation_loss=loss)
            layer.status = LayerStatus.FACTORED
            module = LowRankLinear.from_factors(down, up, slot.module.bias, layer)
            c.replacements.append((slot, module))
            c.rewritten[view] = module
        c.layers[view] = layer
    for view in c.linears:
        if not view.meta.compressible and view not in c.recorded and view not in c.latent_projections:
            meta = view.meta
            skipped = LayerPlan(meta.name, meta.out_features, meta.in_features, None, meta.skip_reason)
            c.layers[view] = CompressedLayer(skipped, "", LayerStatus.SKIPPED, meta.weight_dtype)
            c.records += _skipped_linear_records(c, view)
    c.layers.update(c.recorded)


def _skipped_linear_records(c: GraphCompression, view: LinearNode) -> list[tuple[nn.Module, CompressedLayer]]:
    """Records for the model's ``nn.Linear`` modules holding a skipped layer's weight (the excluded output head,
    a head tied to the embedding), so that ``model_report`` and a saved folder name them and why."""
    slot = weight_owner(c.gm, view, c.frame_locals)
    weight = None if slot is None else getattr(slot.module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return []
    found = []
    for path, module in slot.root.named_modules():
        if not isinstance(module, nn.Linear) or module.weight is not weight or module_record(module) is not None:
            continue
        reason = view.meta.skip_reason if path == view.meta.name else \
            f"tied to {view.meta.name}: {view.meta.skip_reason}"
        found.append(_skipped_record(c, path, module, reason))
    return found


def _skipped_record(c: GraphCompression, path: str, module: nn.Linear, reason: str
                    ) -> tuple[nn.Module, CompressedLayer]:
    plan = LayerPlan(path, module.out_features, module.in_features, None, reason)
    return module, CompressedLayer(plan, "", LayerStatus.SKIPPED, module.weight.dtype,
                                   dense_bytes=module.weight.untyped_storage().nbytes(),
                                   options=c.config.deciding_options())


def _quantize(c: GraphCompression) -> None:
    """AQLM (``quantize="aqlm"``): each new layer's weight, or its factors, becomes codes fit to its input Gram."""
    spec = c.config.aq_spec
    if spec is None:
        return
    settings = AQSettings(spec, c.config.aq_beam_size, c.config.aq_tolerance)
    values = placeholder_values(c.gm, c.example_inputs)
    for view in c.to_compress():
        layer, slot = c.layers[view], c.owners[view]
        factored = c.rewritten.get(view) if layer.status is LayerStatus.FACTORED else None
        why = aq_would_not_save(spec, layer.plan, view.meta.weight_dtype)
        if why:
            layer.plan = replace(layer.plan, reason=why)
            log.info("%s stays %s: %s", layer.name, "factored" if factored is not None else "dense", why)
            continue
        gram = None if view.meta.stats is None else view.meta.stats.gram
        weight = dense_weight(c.gm, view, values)
        if factored is not None:
            module = quantize_factors(weight, factored.down, factored.up, gram, factored.bias, layer, settings)
            c.replacements.remove((slot, factored))
        else:
            c.records.remove((slot.module, layer))
            module = quantize_dense(weight, gram, slot.module.bias, layer, settings)
        c.replacements.append((slot, module))
        c.rewritten[view] = module


def _rewrite_linears(c: GraphCompression) -> None:
    """Rewrite the graph so each new module's layer reads its factors or codes."""
    factorize_linears(c.gm, {v: m for v, m in c.rewritten.items() if isinstance(m, LowRankLinear)})
    quantized = {v: m for v, m in c.rewritten.items() if isinstance(m, (AQLinear, AQLowRankLinear))}
    if quantized:
        quantize_linears(c.gm, quantized)


def _factors(decomposition: LinearDecomposition, rank: int, view: LinearNode) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(down, up)`` at ``rank`` in the layer's dtype (on the weight's device, where the SVD ran), and the
    truncation loss."""
    down, up = decomposition.factors(rank, view.meta.weight_dtype)
    return down, up, decomposition.truncation_loss(rank)


def _kv_ranks(c: GraphCompression) -> dict[str, int]:
    """Each new block's K and V rank per group under ``kv_ratio``, at most the group's full rank (its input width,
    when heads are wider than the hidden state): a latent that wide is exact already."""
    ranks = _allocate_kv_ranks(c)
    full = {view.meta.name: min(view.meta.in_features, _kv_group_size(c, block) * block.head_dim)
            for block in c.new_blocks() for view in (block.k_linear, block.v_linear)}
    capped = {name: min(rank, full[name]) for name, rank in ranks.items()}
    if capped != ranks:
        log.info("K/V ranks capped at the groups' full rank (the projections' input width): %s",
                 ", ".join(f"{name} {ranks[name]} -> {rank}" for name, rank in capped.items() if rank != ranks[name]))
    return capped


def _allocate_kv_ranks(c: GraphCompression) -> dict[str, int]:
    cfg = c.config
    projections = []
    for block in c.new_blocks():
        group = _kv_group_size(c, block)
        for view in (block.k_linear, block.v_linear):
            energy: tuple[float, ...] = ()
            if cfg.kv_allocation == "closed_form" and cfg.kv_needs_calibration:
                groups = group_decompositions(c.weight(view), block.num_kv_heads // group, cfg.method,
                                              block.k_linear.meta.stats, cfg.alpha, view.meta.name,
                                              _group_metrics(c, block, view))
                energy = tuple(torch.stack([energy_share(d.s) for d in groups]).mean(0).tolist())
            projections.append(KVProjection(view.meta.name, block.num_kv_heads // group, group * block.head_dim,
                                            c.kv_fisher.get(view.meta.name, 0.0),
                                            c.kv_sensitivity.get(view.meta.name, {}), energy,
                                            key=view is block.k_linear))
    if cfg.kv_allocation == "closed_form" and any(p.energy for p in projections):
        return allocate_kv_closed_form(projections, cfg.kv_ratio, cfg.rank_multiple)
    if cfg.kv_allocation == "fisher" and c.kv_fisher:
        return allocate_kv_fisher(projections, cfg.kv_ratio, cfg.rank_multiple)
    if cfg.kv_allocation == "sensitivity" and c.kv_sensitivity:
        return allocate_kv_sensitivity(projections, cfg.kv_ratio, cfg.rank_multiple)
    return allocate_kv_uniform(projections, cfg.kv_ratio, cfg.rank_multiple, cfg.kv_key_share)


def _restructure_attention(c: GraphCompression) -> None:
    """Factor new blocks' K/V per head group into ``GroupedLowRankProjection`` modules, and rewrite every
    block (new or read back from the model) to latent attention."""
    if not c.blocks:
        return
    ranks = _kv_ranks(c) if c.new_blocks() else {}
    values = placeholder_values(c.gm, c.example_inputs)
    method = c.config.method if c.config.kv_needs_calibration else "svd"  # kv_ratio 1 is exact with any method
    rewrites = []
    for block, layer in c.blocks:
        modules = None
        if layer is None:
            k_slot, v_slot = c.owners[block.k_linear], c.owners[block.v_linear]
            # the biases are kept as the model's own parameters
            weights = {**block_weights(c.gm, block, values), "k_bias": k_slot.module.bias, "v_bias": v_slot.module.bias}
            layer, *modules = build_latent_attention(block, weights, _kv_group_size(c, block),
                                                     ranks[block.k_linear.meta.name], ranks[block.v_linear.meta.name],
                                                     method, block.k_linear.meta.stats, c.config.alpha,
                                                     c.kv_metrics.get(block.name) if method == "whiten" else None)
            layer.options = c.config.deciding_options()
            c.replacements += [(k_slot, modules[0]), (v_slot, modules[1])]
            o = block.o_linear.meta
            plan = LayerPlan(o.name, o.out_features, o.in_features, None, f"output projection of latent attention {block.name}")
            o_weight = c.weight(block.o_linear)
            o_record = CompressedLayer(plan, method, LayerStatus.LATENT, o_weight.dtype,
                                       dense_bytes=o_weight.untyped_storage().nbytes(), options=layer.options)
            c.records.append((c.owners[block.o_linear].module, o_record))
            c.layers[block.o_linear] = o_record
        elif block.o_linear in c.recorded:
            c.layers[block.o_linear] = c.recorded[block.o_linear]
        rewrites.append((block, layer, modules))
        c.latent.append(layer)
    restructure_attention(c.gm, rewrites)


def _release_dense(c: GraphCompression) -> None:
    """Drop the dense weights of replaced layers from the graph (the model drops them with their modules)."""
    replaced = [v for v, layer in c.layers.items()
                if layer.status in (LayerStatus.FACTORED, LayerStatus.QUANTIZED) and v not in c.recorded]
    replaced += [view for block, _ in c.blocks if not block.restructured for view in (block.k_linear, block.v_linear)]
    if replaced:
        _, c.kept_inputs = release_dense_weights(c.gm, replaced, c.example_inputs)
        c.instance_input = _instance_input(c)


def _instance_input(c: GraphCompression) -> tuple[int, str, torch.Tensor] | None:
    """A model-state input that identifies the model instance whose new factors this graph reads.

    Dynamo reuses a graph for another instance of the same class when the
    backends compare equal (same options object, or equal option dicts); the
    graph that compressed a model would then run that model's factors. Graphs
    of a model compressed already read the factors as inputs and need no check.
    """
    kept = c.kept_inputs if c.kept_inputs is not None else range(len(c.example_inputs))
    placeholders = [n for n in c.gm.graph.nodes if n.op == "placeholder"]
    for position, (node, index) in enumerate(zip(placeholders, kept)):
        source = node.meta["grapharg"].source.name if is_state_input(node) else ""
        # a parameter or buffer: the same tensor at every call (a float attribute lifted under dynamic=True is not)
        if ("._parameters[" in source or "._buffers[" in source) and isinstance(c.example_inputs[index], torch.Tensor):
            return position, source, c.example_inputs[index]
    return None


PASSES: tuple[Pass[GraphCompression], ...] = (
    Pass("find_linears", _find_linears, provides=frozenset({"linears"})),
    Pass("find_attention", _find_attention, frozenset({"linears"}), frozenset({"attention"})),
    Pass("activation_stats", _activation_stats, frozenset({"linears", "attention"}), frozenset({"stats"})),
    Pass("kv_metrics", _kv_metrics, frozenset({"stats"}), frozenset({"kv_metrics"})),
    Pass("kv_fisher", _kv_fisher, frozenset({"stats"}), frozenset({"fisher"})),
    Pass("kv_sensitivity", _kv_sensitivity, frozenset({"kv_metrics"}), frozenset({"kv_sensitivity"})),
    Pass("sensitivity", _sensitivity, frozenset({"stats"}), frozenset({"sensitivity"})),
    Pass("allocate_ranks", _allocate_ranks, frozenset({"stats", "sensitivity"}), frozenset({"plan"})),
    Pass("factorize_linears", _factorize, frozenset({"plan"}), frozenset({"factored"})),
    Pass("quantize_linears", _quantize, frozenset({"factored"}), frozenset({"quantized"})),
    Pass("rewrite_linears", _rewrite_linears, frozenset({"quantized"}), frozenset({"rewritten"})),
    Pass("restructure_attention", _restructure_attention,
         frozenset({"factored", "kv_metrics", "fisher", "kv_sensitivity"}),
         frozenset({"latent"})),
    Pass("release_dense", _release_dense, frozenset({"rewritten", "latent"}), frozenset({"released"})),
)


def _new_dump_folder(root: Path) -> Path:
    """``root/graph_NNN`` with the first number no earlier graph (of this run or another) took."""
    return next(folder for i in itertools.count() if not (folder := root / f"graph_{i:03d}").exists())


def compress_graph(gm: fx.GraphModule, example_inputs: list[Any] | None, config: LowRankConfig) -> GraphCompression:
    """Run every pass on ``gm``; the result holds the rewritten graph, the plan, the report and the modules
    to install on the model (:func:`install`). Called from a Dynamo backend, the model's modules are found
    in the captured frame; for other graphs (``symbolic_trace``, ``torch.export``) in ``gm`` itself."""
    for stage, what in (("finetune", "fine-tunes each decoder block against the dense block"),
                        ("distill", "distils the compressed model from the dense model's logits")):
        epochs = getattr(config, f"{stage}_epochs")
        if epochs:
            raise LowRankConfigError(
                f"option {stage}_epochs={epochs} {what} and runs block by block: use "
                f"lrcompile.compress_model_blocks(model, batches, config, out) or `lrcompile compress MODEL "
                f"--{stage}-epochs N`, or set {stage}_epochs=0 for torch.compile"
                + (" and call lrcompile.distill_model on the compressed model" if stage == "distill" else ""))
    dump_dir = _new_dump_folder(Path(config.dump_dir)) if config.dump_dir else None
    compression = GraphCompression(gm, list(example_inputs or []), config, captured_frame(gm))
    frame = compression.frame
    source = ("a graph not captured by Dynamo" if frame is None else f"Dynamo's frame {frame.description}"
              + (", which starts after a graph break" if frame.after_graph_break else ""))
    manager = PassManager(PASSES, dump_dir, source)
    manager.run(compression, lambda c: c.gm)
    compression.timings = manager.timings
    compression.report = build_report(_layer_bytes(compression), config.to_json(), manager.timings,
                                      _block_bytes(compression),
                                      [(u.name, u.reason) for u in compression.unmatched_attention
                                       if config.kv_ratio is not None])  # left dense only when a cache was asked for
    compression.report.log()
    if dump_dir is not None:
        if compression.plan is not None and compression.plan.layers:  # not a recompile over recorded layers
            (dump_dir / "plan.json").write_text(json.dumps(plan_to_json(compression.plan), indent=2))
        compression.report.save(dump_dir)
    return compression


def _layer_bytes(c: GraphCompression) -> list[tuple[CompressedLayer, int]]:
    """Each layer's record once, with the bytes of the factors holding it (new or on the model)."""
    modules = {id(module.lowrank_record): module for _, module in c.replacements}
    for view in c.recorded:
        module = weight_owner(c.gm, view, c.frame_locals).module
        modules.setdefault(id(module.lowrank_record), module)
    found, seen = [], set()
    for view in c.linears:
        layer = c.layers.get(view)
        if layer is not None and id(layer) not in seen:
            seen.add(id(layer))
            held = layer.status in (LayerStatus.FACTORED, LayerStatus.QUANTIZED)
            found.append((layer, factor_bytes(modules[id(layer)]) if held else 0))
    return found


def _block_bytes(c: GraphCompression) -> list[tuple[LatentAttention, int]]:
    """Each restructured block's record with the bytes of its K and V group factors."""
    found = []
    for block, layer in zip((block for block, _ in c.blocks), c.latent):
        if block.restructured:
            projections = [weight_owner(c.gm, view.latent, c.frame_locals).module for view in (block.k_linear, block.v_linear)]
        else:
            projections = [m for _, m in c.replacements if m.lowrank_record is layer]
        found.append((layer, sum(factor_bytes(m) for m in projections)))
    return found


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
