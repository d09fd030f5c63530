"""Save and load compressed models: ``plan.json`` plus ``factors.safetensors``, so calibration runs once.

:func:`save_compressed` writes the recorded outcome of every compressed layer
of a model (see :mod:`lrcompile.runtime.compressed_layers`). :func:`load_compressed`
validates a saved folder against a fresh model of the same architecture and
records the outcomes for that model's own weights; the next
``torch.compile(model, backend="lowrank", ...)`` then reuses them and needs
no calibration data. A folder that is missing, corrupted or does not match the
model raises :class:`~lrcompile.errors.SavedPlanError` naming the file and
what is wrong, and records nothing.

``plan.json`` holds ``format`` and ``version``, ``totals`` and one entry per
layer (name, parameter, status, method, rank, out/in features, weight_shape,
reason, sensitivity, truncation_loss, dtype, dense_bytes);
``factors.safetensors`` holds ``<layer name>.down`` and ``<layer name>.up`` for
every factored layer. Factors are stored in the linear sense (``down [rank, in]``, ``up [out, rank]``)
whatever the weight's layout; ``weight_shape`` keeps the weight as the model
stores it (``[in, out]`` for HF ``Conv1D``), which the load checks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lrcompile.errors import LowRankError, SavedPlanError
from lrcompile.types import CompressedLayer, LayerPlan, LayerStatus

from .compressed_layers import model_layers, record_layer

log = logging.getLogger(__name__)

FORMAT = "lrcompile.compressed"
VERSION = 1
PLAN_FILE = "plan.json"
FACTORS_FILE = "factors.safetensors"

_LAYER_KEYS = (
    "name", "parameter", "status", "method", "rank", "out_features", "in_features", "weight_shape",
    "reason", "sensitivity", "truncation_loss", "dtype", "dense_bytes",
)  # fmt: skip


@dataclass(frozen=True)
class SavedLayer:
    """One entry of ``plan.json``: a layer's outcome and the parameter that holds its dense weight."""

    parameter: str  # e.g. "model.layers.0.mlp.up_proj.weight"
    plan: LayerPlan
    status: LayerStatus
    method: str
    dtype: torch.dtype
    weight_shape: tuple[int, ...]  # as the model stores it
    dense_bytes: int

    @property
    def name(self) -> str:
        return self.plan.name

    def to_json(self) -> dict[str, Any]:
        p = self.plan
        return {
            "name": p.name,
            "parameter": self.parameter,
            "status": self.status.value,
            "method": self.method,
            "rank": p.rank,
            "out_features": p.out_features,
            "in_features": p.in_features,
            "weight_shape": list(self.weight_shape),
            "reason": p.reason,
            "sensitivity": p.sensitivity,
            "truncation_loss": p.truncation_loss,
            "dtype": str(self.dtype).removeprefix("torch."),
            "dense_bytes": self.dense_bytes,
        }


@dataclass(frozen=True)
class SavedPlan:
    """The validated content of a saved folder's ``plan.json``."""

    folder: Path
    layers: tuple[SavedLayer, ...]
    totals: Mapping[str, Any]

    @property
    def plan_path(self) -> Path:
        return self.folder / PLAN_FILE

    @property
    def factors_path(self) -> Path:
        return self.folder / FACTORS_FILE


@dataclass(frozen=True)
class LoadSummary:
    """What :func:`load_compressed` recorded for the model."""

    folder: Path
    layers: int
    factored: int
    dense: int
    skipped: int


def _totals(layers: tuple[SavedLayer, ...]) -> dict[str, Any]:
    compressible = [s for s in layers if s.status is not LayerStatus.SKIPPED]
    before = sum(s.plan.dense_params for s in compressible)
    after = sum(s.plan.params_after for s in compressible)
    return {
        "linears": len(layers),
        "factored": sum(s.status is LayerStatus.FACTORED for s in layers),
        "dense": sum(s.status is LayerStatus.DENSE for s in layers),
        "skipped": sum(s.status is LayerStatus.SKIPPED for s in layers),
        "params_before": before,
        "params_after": after,
        "param_ratio": round(after / max(before, 1), 4),
    }


def save_compressed(model: nn.Module, folder: str | Path) -> SavedPlan:
    """Write the compressed layers recorded for ``model`` into ``folder`` (created if needed).

    ``model`` must have been compiled with ``backend="lowrank"`` and called once.
    """
    folder = Path(folder)
    entries: list[SavedLayer] = []
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    names: set[str] = set()
    for parameter, layer in model_layers(model):
        if id(layer) in seen:  # a tied weight appears under several parameter names
            continue
        if layer.name in names:
            raise LowRankError(f"cannot save {type(model).__name__}: two recorded layers are named {layer.name!r}")
        seen.add(id(layer))
        names.add(layer.name)
        weight = model.get_parameter(parameter)
        entries.append(
            SavedLayer(parameter, layer.plan, layer.status, layer.method, layer.dtype, tuple(weight.shape), layer.dense_bytes)
        )
        if layer.status is LayerStatus.FACTORED:
            tensors[f"{layer.name}.down"] = layer.down.detach().cpu().contiguous()
            tensors[f"{layer.name}.up"] = layer.up.detach().cpu().contiguous()
    if not entries:
        raise LowRankError(
            f"{type(model).__name__} has no compressed layers to save: compile it with backend='lowrank' "
            "and call the compiled model once first"
        )
    saved = SavedPlan(folder, tuple(entries), _totals(tuple(entries)))
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(saved.factors_path), metadata={"format": FORMAT, "version": str(VERSION)})
    document = {
        "format": FORMAT,
        "version": VERSION,
        "totals": saved.totals,
        "layers": [s.to_json() for s in entries],
    }
    saved.plan_path.write_text(json.dumps(document, indent=2))
    log.info("saved %d layers (%d factored) to %s", len(entries), saved.totals["factored"], folder)
    return saved


def _field(path: Path, where: str, entry: Mapping[str, Any], key: str, *kinds: type) -> Any:
    """``entry[key]``, checked to be one of ``kinds`` (a JSON boolean is no number)."""
    value = entry[key]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        allowed = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise SavedPlanError(f"{path}: {where}: key {key!r}={value!r} must be {allowed}")
    return value


def _parse_layer(path: Path, index: int, entry: Any) -> SavedLayer:
    where = f"layer {index}"
    if not isinstance(entry, dict):
        raise SavedPlanError(f"{path}: {where} is a {type(entry).__name__}, expected an object")
    if isinstance(entry.get("name"), str):
        where = f"layer {index} ({entry['name']!r})"
    missing = [k for k in _LAYER_KEYS if k not in entry]
    if missing:
        raise SavedPlanError(f"{path}: {where} lacks key(s) {', '.join(map(repr, missing))}")
    name = _field(path, where, entry, "name", str)
    parameter = _field(path, where, entry, "parameter", str)
    try:
        status = LayerStatus(_field(path, where, entry, "status", str))
    except ValueError:
        allowed = ", ".join(repr(s.value) for s in LayerStatus)
        raise SavedPlanError(f"{path}: {where}: status {entry['status']!r} is not one of {allowed}") from None
    out_features = _field(path, where, entry, "out_features", int)
    in_features = _field(path, where, entry, "in_features", int)
    rank = _field(path, where, entry, "rank", int, type(None))
    if out_features < 1 or in_features < 1:
        raise SavedPlanError(f"{path}: {where}: out_features/in_features must be positive, got {out_features}/{in_features}")
    if status is LayerStatus.FACTORED and (rank is None or rank < 1):
        raise SavedPlanError(f"{path}: {where}: a factored layer needs a positive rank, got {rank!r}")
    if status is not LayerStatus.FACTORED and rank is not None:
        raise SavedPlanError(f"{path}: {where}: a {status.value} layer must have rank null, got {rank!r}")
    shape = _field(path, where, entry, "weight_shape", list)
    if shape not in ([out_features, in_features], [in_features, out_features]):
        raise SavedPlanError(
            f"{path}: {where}: weight_shape {shape} does not hold out_features={out_features}, in_features={in_features}"
        )
    dtype = getattr(torch, _field(path, where, entry, "dtype", str), None)
    if not isinstance(dtype, torch.dtype):
        raise SavedPlanError(f"{path}: {where}: dtype {entry['dtype']!r} is not a torch dtype")
    dense_bytes = _field(path, where, entry, "dense_bytes", int)
    plan = LayerPlan(
        name,
        out_features,
        in_features,
        rank,
        _field(path, where, entry, "reason", str),
        _field(path, where, entry, "sensitivity", int, float, type(None)),
        _field(path, where, entry, "truncation_loss", int, float, type(None)),
    )
    method = _field(path, where, entry, "method", str)
    return SavedLayer(parameter, plan, status, method, dtype, tuple(shape), dense_bytes)


def read_plan(folder: str | Path) -> SavedPlan:
    """Read and validate ``folder/plan.json`` (the factors are checked by :func:`load_compressed`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SavedPlanError(f"{folder}: no such folder (expected a folder written by save_compressed)")
    path = folder / PLAN_FILE
    if not path.is_file():
        raise SavedPlanError(f"{path}: missing (a folder written by save_compressed holds {PLAN_FILE} and {FACTORS_FILE})")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SavedPlanError(f"{path}: invalid JSON: {err}") from None
    if not isinstance(document, dict):
        raise SavedPlanError(f"{path}: expected a JSON object, got {type(document).__name__}")
    if document.get("format") != FORMAT:
        raise SavedPlanError(f"{path}: format {document.get('format')!r} is not {FORMAT!r}")
    if document.get("version") != VERSION:
        raise SavedPlanError(f"{path}: version {document.get('version')!r} is not supported (this lrcompile reads {VERSION})")
    layers = document.get("layers")
    if not isinstance(layers, list) or not layers:
        raise SavedPlanError(f"{path}: key 'layers' must be a non-empty list, got {layers!r:.80}")
    parsed = tuple(_parse_layer(path, i, entry) for i, entry in enumerate(layers))
    for key in ("name", "parameter"):
        values = [getattr(s, key) for s in parsed]
        duplicates = sorted({v for v in values if values.count(v) > 1})
        if duplicates:
            raise SavedPlanError(f"{path}: layers repeat the {key}(s) {', '.join(map(repr, duplicates))}")
    return SavedPlan(folder, parsed, _totals(parsed))


def _factor(path: Path, tensors: dict[str, torch.Tensor], s: SavedLayer, part: str) -> torch.Tensor:
    key = f"{s.name}.{part}"
    tensor = tensors.pop(key, None)
    if tensor is None:
        raise SavedPlanError(f"{path}: tensor {key!r} is missing (layer {s.name!r} is factored)")
    p = s.plan
    expected = (p.rank, p.in_features) if part == "down" else (p.out_features, p.rank)
    if tuple(tensor.shape) != expected:
        raise SavedPlanError(
            f"{path}: tensor {key!r} has shape {list(tensor.shape)}, but {PLAN_FILE} says "
            f"{list(expected)} (rank {p.rank}, out {p.out_features}, in {p.in_features})"
        )
    if tensor.dtype != s.dtype:
        raise SavedPlanError(f"{path}: tensor {key!r} is {tensor.dtype}, but {PLAN_FILE} says {s.dtype}")
    return tensor


def read_factors(saved: SavedPlan) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer name: (down, up)}`` from ``factors.safetensors`` (on CPU), checked against the plan."""
    path = saved.factors_path
    if not path.is_file():
        raise SavedPlanError(f"{path}: missing (it holds the factors of the {saved.totals['factored']} factored layers)")
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise SavedPlanError(f"{path}: not a readable safetensors file: {err}") from None
    factors = {
        s.name: (_factor(path, tensors, s, "down"), _factor(path, tensors, s, "up"))
        for s in saved.layers
        if s.status is LayerStatus.FACTORED
    }
    if tensors:
        raise SavedPlanError(f"{path}: tensors {', '.join(map(repr, sorted(tensors)))} belong to no factored layer of {PLAN_FILE}")
    return factors


def _match_weight(saved: SavedPlan, s: SavedLayer, parameters: Mapping[str, torch.Tensor], model: nn.Module) -> torch.Tensor:
    weight = parameters.get(s.parameter)
    if weight is None:
        raise SavedPlanError(
            f"{saved.plan_path}: layer {s.name!r} (parameter {s.parameter!r}) is not in the model "
            f"({type(model).__name__}); was the folder saved from another architecture?"
        )
    if tuple(weight.shape) != s.weight_shape:
        raise SavedPlanError(
            f"{saved.plan_path}: layer {s.name!r}: the model's weight {s.parameter!r} has shape {list(weight.shape)}, "
            f"the plan says {list(s.weight_shape)}"
        )
    if weight.dtype != s.dtype:
        raise SavedPlanError(
            f"{saved.plan_path}: layer {s.name!r}: the model's weight is {weight.dtype}, the plan says {s.dtype}; "
            "load the model in the dtype it was compressed in"
        )
    if weight.untyped_storage().nbytes() == 0:
        raise SavedPlanError(
            f"{saved.plan_path}: layer {s.name!r}: the model's weight {s.parameter!r} holds no data (its dense "
            "storage was released by an earlier compression); load into a freshly built model"
        )
    return weight


def load_compressed(model: nn.Module, folder: str | Path) -> LoadSummary:
    """Validate ``folder`` against ``model`` and record its layers' outcomes for the model's weights.

    Compile ``model`` with ``backend="lowrank"`` afterwards: layers with a
    loaded outcome are rewritten without calibration. Nothing is recorded
    unless the whole folder matches.
    """
    saved = read_plan(folder)
    factors = read_factors(saved)
    parameters = dict(model.named_parameters(remove_duplicate=False))
    records: list[tuple[torch.Tensor, CompressedLayer]] = []
    for s in saved.layers:
        weight = _match_weight(saved, s, parameters, model)
        layer = CompressedLayer(s.plan, s.method, s.status, s.dtype, dense_bytes=s.dense_bytes)
        if s.status is LayerStatus.FACTORED:
            down, up = factors[s.name]
            layer.down, layer.up = down.to(weight.device), up.to(weight.device)
        records.append((weight, layer))
    for weight, layer in records:
        record_layer(weight, layer)
    totals = saved.totals
    summary = LoadSummary(saved.folder, len(records), totals["factored"], totals["dense"], totals["skipped"])
    log.info("loaded %d layers (%d factored) from %s", summary.layers, summary.factored, saved.folder)
    return summary
