"""Folders written by earlier lrcompile versions (``plan.json`` + ``factors.safetensors``): read them into a model.

A compressed model now saves with ``save_pretrained`` (see
:mod:`lrcompile.hf_quantizer`); this module only reads the former format, so
that folders compressed before keep working. :func:`load_compressed`
validates a folder against a freshly built dense model of the same
architecture and swaps that model's linears for their compressed modules
(:mod:`lrcompile.modules`), exactly as the backend would have left them; the
model then runs eagerly, compiles without calibration and saves with
``save_pretrained``. A folder that is missing, corrupted or does not match
the model raises :class:`~lrcompile.errors.SavedPlanError` naming the file
and what is wrong, and changes nothing.

``plan.json`` holds ``format`` and ``version``, ``totals`` and one entry per
layer (name, parameter, status, method, rank, out/in features, weight_shape,
reason, sensitivity, truncation_loss, dtype, dense_bytes);
``factors.safetensors`` holds ``<layer name>.down`` and ``<layer name>.up`` for
every factored layer, in the linear sense (``down [rank, in]``, ``up [out, rank]``)
whatever the weight's layout; ``weight_shape`` keeps the weight as the model
stores it (``[in, out]`` for HF ``Conv1D``), which the load checks.

Version 2 adds attention blocks restructured for a latent KV cache: an
``attention`` list (name, k_parameter, method, group_size, num_heads,
num_kv_heads, head_dim, k_rank, v_rank, dtype, dense_bytes,
k/v_truncation_loss, has_k_bias, has_o_bias) and the tensors
``<block>.k_down``, ``.k_up``, ``.k_bias``, ``.v_down``, ``.o_weight``,
``.o_bias``. That format folded V's up-projection into the output weight
(``o_weight[:, h] = W_o[:, h] U^v_{j(h)}``, Palu Eq. 6) and did not keep
``U^v``; the model now keeps ``o_proj`` dense and ``U^v`` on its V projection,
so the load recovers each KV head's ``U^v_j`` from the fresh model's ``W_o``
by least squares over the query heads that read it (exact when ``W_o``'s
per-head columns are independent, as for any trained model), and refuses the
folder when the fit is not exact (an ``o_proj`` other than the one the folder was
compressed from).
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
from safetensors.torch import load_file
from torch import nn

from lrcompile.errors import SavedPlanError
from lrcompile.hf_quantizer import describe_on_config
from lrcompile.modules import RECORD, GroupedLowRankProjection, LowRankLinear
from lrcompile.types import FACTOR_METHODS, CompressedLayer, LatentAttention, LayerPlan, LayerStatus, dtype_from_name

log = logging.getLogger(__name__)

FORMAT = "lrcompile.compressed"
READABLE_VERSIONS = (1, 2)
V_UP_TOLERANCE = 1e-4  # relative residual of the least-squares recovery of V's up-projection
PLAN_FILE = "plan.json"
FACTORS_FILE = "factors.safetensors"

_LAYER_KEYS = (
    "name", "parameter", "status", "method", "rank", "out_features", "in_features", "weight_shape",
    "reason", "sensitivity", "truncation_loss", "dtype", "dense_bytes",
)  # fmt: skip
_ATTENTION_KEYS = (
    "name", "k_parameter", "method", "group_size", "num_heads", "num_kv_heads", "head_dim", "k_rank", "v_rank",
    "dtype", "dense_bytes", "k_truncation_loss", "v_truncation_loss", "has_k_bias", "has_o_bias",
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


@dataclass(frozen=True)
class SavedAttention:
    """One ``attention`` entry of ``plan.json``: a block restructured for a latent KV cache (tensors apart)."""

    name: str  # e.g. "model.layers.0.self_attn"
    k_parameter: str  # the K projection's weight, e.g. "model.layers.0.self_attn.k_proj.weight"
    method: str
    group_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    k_rank: int
    v_rank: int
    dtype: torch.dtype
    dense_bytes: int
    k_truncation_loss: float | None
    v_truncation_loss: float | None
    has_k_bias: bool
    has_o_bias: bool
    hidden: int  # the K projection's in_features (from its layer entry), the width of the latent projections

    @property
    def groups(self) -> int:
        return self.num_kv_heads // self.group_size

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of every tensor this block stores (biases only where it has them)."""
        shapes = {
            "k_down": (self.groups * self.k_rank, self.hidden),
            "k_up": (self.groups, self.group_size * self.head_dim, self.k_rank),
            "k_bias": (self.num_kv_heads * self.head_dim,),
            "v_down": (self.groups * self.v_rank, self.hidden),
            "o_weight": (self.hidden, self.num_heads * self.v_rank),  # o_proj maps back to the residual width
            "o_bias": (self.hidden,),
        }
        if not self.has_k_bias:
            del shapes["k_bias"]
        if not self.has_o_bias:
            del shapes["o_bias"]
        return shapes


@dataclass(frozen=True)
class SavedPlan:
    """The validated content of a saved folder's ``plan.json``."""

    folder: Path
    layers: tuple[SavedLayer, ...]
    totals: Mapping[str, Any]
    attention: tuple[SavedAttention, ...] = ()
    version: int = 2

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
    latent: int = 0  # K/V/output projections of restructured attention blocks
    attention: int = 0  # attention blocks restructured for a latent KV cache


def _totals(layers: tuple[SavedLayer, ...], attention: tuple[SavedAttention, ...] = ()) -> dict[str, Any]:
    # like the report: the projections of latent attention are not under the parameter budget
    compressible = [s for s in layers if s.status not in (LayerStatus.SKIPPED, LayerStatus.LATENT)]
    before = sum(s.plan.dense_params for s in compressible)
    after = sum(s.plan.params_after for s in compressible)
    return {
        "linears": len(layers),
        "factored": sum(s.status is LayerStatus.FACTORED for s in layers),
        "dense": sum(s.status is LayerStatus.DENSE for s in layers),
        "skipped": sum(s.status is LayerStatus.SKIPPED for s in layers),
        "latent": sum(s.status is LayerStatus.LATENT for s in layers),
        "attention": len(attention),
        "params_before": before,
        "params_after": after,
        "param_ratio": round(after / max(before, 1), 4),
    }


def _field(path: Path, where: str, entry: Mapping[str, Any], key: str, *kinds: type) -> Any:
    """``entry[key]``, checked to be one of ``kinds`` (a JSON boolean is no number)."""
    value = entry[key]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        allowed = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise SavedPlanError(f"{path}: {where}: key {key!r}={value!r} must be {allowed}")
    return value


def _entry_where(path: Path, kind: str, index: int, entry: Any, keys: tuple[str, ...]) -> str:
    """``"<kind> <index> ('<name>')"`` for messages, once ``entry`` is checked to be an object holding ``keys``."""
    where = f"{kind} {index}"
    if not isinstance(entry, dict):
        raise SavedPlanError(f"{path}: {where} is a {type(entry).__name__}, expected an object")
    if isinstance(entry.get("name"), str):
        where = f"{kind} {index} ({entry['name']!r})"
    missing = [k for k in keys if k not in entry]
    if missing:
        raise SavedPlanError(f"{path}: {where} lacks key(s) {', '.join(map(repr, missing))}")
    return where


def _parse_layer(path: Path, index: int, entry: Any) -> SavedLayer:
    where = _entry_where(path, "layer", index, entry, _LAYER_KEYS)
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
    dtype = dtype_from_name(_field(path, where, entry, "dtype", str))
    if dtype is None:
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
        raise SavedPlanError(f"{folder}: no such folder (expected a folder written by an earlier lrcompile compress)")
    path = folder / PLAN_FILE
    if not path.is_file():
        raise SavedPlanError(f"{path}: missing (a folder written by an earlier lrcompile compress holds {PLAN_FILE} and "
                             f"{FACTORS_FILE}; folders saved with save_pretrained load with from_pretrained)")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SavedPlanError(f"{path}: invalid JSON: {err}") from None
    if not isinstance(document, dict):
        raise SavedPlanError(f"{path}: expected a JSON object, got {type(document).__name__}")
    if document.get("format") != FORMAT:
        raise SavedPlanError(f"{path}: format {document.get('format')!r} is not {FORMAT!r}")
    version = document.get("version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        readable = ", ".join(map(str, READABLE_VERSIONS))
        raise SavedPlanError(f"{path}: version {version!r} is not supported (this lrcompile reads {readable})")
    layers = document.get("layers")
    if not isinstance(layers, list) or not layers:
        raise SavedPlanError(f"{path}: key 'layers' must be a non-empty list, got {layers!r:.80}")
    parsed = tuple(_parse_layer(path, i, entry) for i, entry in enumerate(layers))
    for key in ("name", "parameter"):
        values = [getattr(s, key) for s in parsed]
        duplicates = sorted({v for v in values if values.count(v) > 1})
        if duplicates:
            raise SavedPlanError(f"{path}: layers repeat the {key}(s) {', '.join(map(repr, duplicates))}")
    if version == 1:
        if "attention" in document:
            raise SavedPlanError(f"{path}: version 1 has no key 'attention' (it was added in version 2)")
        entries: list[Any] = []
    else:
        entries = document.get("attention")
        if not isinstance(entries, list):
            raise SavedPlanError(f"{path}: key 'attention' must be a list (empty when no block has a latent KV cache), "
                                 f"got {entries!r:.80}")
    by_parameter = {s.parameter: s for s in parsed}
    attention = tuple(_parse_attention(path, i, entry, by_parameter) for i, entry in enumerate(entries))
    _check_latent_layers(path, parsed, attention)
    return SavedPlan(folder, parsed, _totals(parsed, attention), attention, version)


def _parse_attention(path: Path, index: int, entry: Any, layers: Mapping[str, SavedLayer]) -> SavedAttention:
    where = _entry_where(path, "attention", index, entry, _ATTENTION_KEYS)
    name = _field(path, where, entry, "name", str)
    k_parameter = _field(path, where, entry, "k_parameter", str)
    method = _field(path, where, entry, "method", str)
    if method not in FACTOR_METHODS:
        raise SavedPlanError(f"{path}: {where}: method {method!r} is not one of {', '.join(map(repr, FACTOR_METHODS))}")
    sizes = {}
    for key in ("group_size", "num_heads", "num_kv_heads", "head_dim", "k_rank", "v_rank"):
        sizes[key] = _field(path, where, entry, key, int)
        if sizes[key] < 1:
            raise SavedPlanError(f"{path}: {where}: key {key!r}={sizes[key]} must be positive")
    heads, kv_heads, group = sizes["num_heads"], sizes["num_kv_heads"], sizes["group_size"]
    if kv_heads % group or heads % kv_heads:
        raise SavedPlanError(
            f"{path}: {where}: group_size={group} must divide num_kv_heads={kv_heads}, which must divide num_heads={heads}"
        )
    width = group * sizes["head_dim"]
    for key in ("k_rank", "v_rank"):
        if sizes[key] > width:
            raise SavedPlanError(
                f"{path}: {where}: {key}={sizes[key]} exceeds the group's width {width} (group_size * head_dim)"
            )
    dtype = dtype_from_name(_field(path, where, entry, "dtype", str))
    if dtype is None:
        raise SavedPlanError(f"{path}: {where}: dtype {entry['dtype']!r} is not a torch dtype")
    dense_bytes = _field(path, where, entry, "dense_bytes", int)
    losses = [_field(path, where, entry, key, int, float, type(None)) for key in ("k_truncation_loss", "v_truncation_loss")]
    has_k_bias = _field(path, where, entry, "has_k_bias", bool)
    has_o_bias = _field(path, where, entry, "has_o_bias", bool)
    k_layer = layers.get(k_parameter)
    if k_layer is None or k_layer.status is not LayerStatus.LATENT:
        raise SavedPlanError(
            f"{path}: {where}: k_parameter {k_parameter!r} is not the parameter of a "
            f"{LayerStatus.LATENT.value!r} layer of the plan"
        )
    if k_layer.name.rsplit(".", 1)[0] != name:
        raise SavedPlanError(f"{path}: {where}: k_parameter {k_parameter!r} is the weight of layer {k_layer.name!r}, "
                             f"which is not a projection of block {name!r}")
    k_out = kv_heads * sizes["head_dim"]
    if k_layer.plan.out_features != k_out:
        raise SavedPlanError(
            f"{path}: {where}: its K projection {k_layer.name!r} has out_features={k_layer.plan.out_features}, but "
            f"num_kv_heads * head_dim = {kv_heads} * {sizes['head_dim']} = {k_out}"
        )
    if k_layer.dtype != dtype:
        raise SavedPlanError(f"{path}: {where}: dtype {dtype} differs from its K projection's {k_layer.dtype}")
    return SavedAttention(
        name, k_parameter, method, group, heads, kv_heads, sizes["head_dim"], sizes["k_rank"], sizes["v_rank"], dtype,
        dense_bytes, *losses, has_k_bias, has_o_bias, k_layer.plan.in_features,
    )


def _check_latent_layers(path: Path, layers: tuple[SavedLayer, ...], attention: tuple[SavedAttention, ...]) -> None:
    """Blocks are unique, and every latent-KV layer is a projection of one of them (a layer recorded
    as latent without its block's restructure would silently stay dense)."""
    for key in ("name", "k_parameter"):
        values = [getattr(a, key) for a in attention]
        duplicates = sorted({v for v in values if values.count(v) > 1})
        if duplicates:
            raise SavedPlanError(f"{path}: attention entries repeat the {key}(s) {', '.join(map(repr, duplicates))}")
    blocks = {a.name for a in attention}
    for s in layers:
        if s.status is LayerStatus.LATENT and s.name.rsplit(".", 1)[0] not in blocks:
            raise SavedPlanError(
                f"{path}: layer {s.name!r} has status {LayerStatus.LATENT.value!r}, but no attention entry restructures "
                f"its block {s.name.rsplit('.', 1)[0]!r} (a folder saved before attention blocks were saved: "
                "compress and save the model again)"
            )


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


def _attention_tensors(path: Path, tensors: dict[str, torch.Tensor], a: SavedAttention) -> dict[str, torch.Tensor]:
    """The block's tensors, popped from ``tensors`` and checked against its plan entry."""
    found = {}
    for part, expected in a.shapes().items():
        key = f"{a.name}.{part}"
        tensor = tensors.pop(key, None)
        if tensor is None:
            raise SavedPlanError(f"{path}: tensor {key!r} is missing (attention block {a.name!r} has a latent KV cache)")
        if tuple(tensor.shape) != expected:
            raise SavedPlanError(
                f"{path}: tensor {key!r} has shape {list(tensor.shape)}, but {PLAN_FILE} says {list(expected)} "
                f"(heads {a.num_heads}, kv_heads {a.num_kv_heads}, head_dim {a.head_dim}, group_size {a.group_size}, "
                f"k_rank {a.k_rank}, v_rank {a.v_rank}, hidden {a.hidden})"
            )
        if tensor.dtype != a.dtype:
            raise SavedPlanError(f"{path}: tensor {key!r} is {tensor.dtype}, but {PLAN_FILE} says {a.dtype}")
        found[part] = tensor
    return found


def _read_tensors(
    saved: SavedPlan,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, dict[str, torch.Tensor]]]:
    path = saved.factors_path
    if not path.is_file():
        raise SavedPlanError(
            f"{path}: missing (it holds the factors of the {saved.totals['factored']} factored layers and the tensors "
            f"of the {len(saved.attention)} latent attention blocks)"
        )
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise SavedPlanError(f"{path}: not a readable safetensors file: {err}") from None
    factors = {
        s.name: (_factor(path, tensors, s, "down"), _factor(path, tensors, s, "up"))
        for s in saved.layers
        if s.status is LayerStatus.FACTORED
    }
    attention = {a.name: _attention_tensors(path, tensors, a) for a in saved.attention}
    if tensors:
        raise SavedPlanError(
            f"{path}: tensors {', '.join(map(repr, sorted(tensors)))} belong to no factored layer or attention block "
            f"of {PLAN_FILE}"
        )
    return factors, attention


def read_factors(saved: SavedPlan) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer name: (down, up)}`` from ``factors.safetensors`` (on CPU), checked against the plan
    (the latent attention blocks' tensors are checked too)."""
    return _read_tensors(saved)[0]


def _module(saved: SavedPlan, model: nn.Module, parameter: str, what: str) -> tuple[nn.Module, str, nn.Module]:
    """``(parent, name, module)`` of the module holding ``parameter`` (``<module path>.weight``)."""
    path = parameter.rpartition(".")[0]
    parent_path, _, name = path.rpartition(".")
    try:
        parent = model.get_submodule(parent_path)
        module = getattr(parent, name)
    except AttributeError:
        module = None
    if not isinstance(getattr(module, "weight", None), torch.Tensor):
        kind = "" if module is None else f" ({type(module).__name__}, compressed already?)"
        raise SavedPlanError(
            f"{saved.plan_path}: {what} (parameter {parameter!r}) is not in the model ({type(model).__name__}){kind}; "
            "load into a freshly built model of the architecture the folder was saved from"
        )
    return parent, name, module


def _match_weight(saved: SavedPlan, s: SavedLayer, model: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    parent, name, module = _module(saved, model, s.parameter, f"layer {s.name!r}")
    weight = module.weight
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
    return parent, name, module


def recover_value_up(saved: SavedPlan, a: SavedAttention, o_dense: torch.Tensor, o_folded: torch.Tensor) -> torch.Tensor:
    """``U^v`` ``[groups, group_size * D, r]`` from ``o_folded[:, h] = W_o[:, h] U^v_{j(h)}`` (Palu Eq. 6).

    For KV head ``j``, stacking the query heads ``h`` that read it gives ``A U^v_j = B`` with
    ``A = [W_o[:, h]]_h`` (``[n_rep * out, D]``) and ``B = [o_folded[:, h]]_h``: solved by least
    squares in float64, refused unless the fit is exact to ``V_UP_TOLERANCE``.
    """
    n_rep = a.num_heads // a.num_kv_heads
    w_o, folded = o_dense.detach().double(), o_folded.double()
    ups = []
    for j in range(a.num_kv_heads):
        heads = range(j * n_rep, (j + 1) * n_rep)
        lhs = torch.cat([w_o[:, h * a.head_dim : (h + 1) * a.head_dim] for h in heads])
        rhs = torch.cat([folded[:, h * a.v_rank : (h + 1) * a.v_rank] for h in heads])
        up = torch.linalg.lstsq(lhs, rhs).solution
        residual = float(torch.linalg.norm(lhs @ up - rhs) / torch.linalg.norm(rhs).clamp_min(1e-30))
        if residual > V_UP_TOLERANCE:
            raise SavedPlanError(
                f"{saved.factors_path}: block {a.name!r}: V's up-projection cannot be recovered from this model's "
                f"o_proj (relative residual {residual:.2e} for KV head {j}): the folder was compressed from other "
                "weights; load it into the dense model it was compressed from"
            )
        ups.append(up)
    return torch.stack(ups).reshape(a.groups, a.group_size * a.head_dim, a.v_rank).to(o_folded.dtype)


def load_compressed(model: nn.Module, folder: str | Path) -> LoadSummary:
    """Validate ``folder`` (written by an earlier lrcompile) against the dense ``model`` and swap in its
    compressed modules: factored linears, and K/V projections of latent attention blocks.

    The model then needs no calibration and no ``kv_ratio`` (``lrcompile.generate`` reads the latent
    ranks from it) and saves with ``save_pretrained``. Nothing changes unless the whole folder matches.
    """
    saved = read_plan(folder)
    factors, attention_tensors = _read_tensors(saved)
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    records: list[tuple[nn.Module, CompressedLayer]] = []
    slots = {}
    for s in saved.layers:
        parent, name, module = slots[s.parameter] = _match_weight(saved, s, model)
        layer = CompressedLayer(s.plan, s.method, s.status, s.dtype, dense_bytes=s.dense_bytes)
        if s.status is LayerStatus.FACTORED:
            down, up = (t.to(module.weight.device) for t in factors[s.name])
            swaps.append((parent, name, LowRankLinear.from_factors(down, up, module.bias, layer)))
        elif s.status is LayerStatus.DENSE:
            records.append((module, layer))
    by_parameter = {s.parameter: s for s in saved.layers}
    for a in saved.attention:
        k_parent, k_name, k_dense = slots[a.k_parameter]
        block = a.k_parameter.rpartition(".k_proj.")[0]
        v_parent, v_name, v_dense = slots.get(f"{block}.v_proj.weight") or _module(saved, model, f"{block}.v_proj.weight",
                                                                                  f"the V projection of {a.name!r}")
        o_parameter = f"{block}.o_proj.weight"
        _, _, o_dense = slots.get(o_parameter) or _module(saved, model, o_parameter, f"the output projection of {a.name!r}")
        if o_parameter in by_parameter:  # it stays the model's dense linear, with its record
            o = by_parameter[o_parameter]
            records.append((o_dense, CompressedLayer(o.plan, o.method, o.status, o.dtype, dense_bytes=o.dense_bytes)))
        tensors = {part: t.to(k_dense.weight.device) for part, t in attention_tensors[a.name].items()}
        record = LatentAttention(
            name=a.name, method=a.method, group_size=a.group_size, num_heads=a.num_heads, num_kv_heads=a.num_kv_heads,
            head_dim=a.head_dim, k_rank=a.k_rank, v_rank=a.v_rank, dtype=a.dtype,
            dense_bytes=k_dense.weight.untyped_storage().nbytes() + v_dense.weight.untyped_storage().nbytes(),
            k_truncation_loss=a.k_truncation_loss, v_truncation_loss=a.v_truncation_loss,
        )
        v_up = recover_value_up(saved, a, o_dense.weight, tensors["o_weight"])
        swaps.append((k_parent, k_name, GroupedLowRankProjection.from_factors(tensors["k_down"], tensors["k_up"],
                                                                             k_dense.bias, record, "k")))
        swaps.append((v_parent, v_name, GroupedLowRankProjection.from_factors(tensors["v_down"], v_up, v_dense.bias,
                                                                             record, "v")))
    for parent, name, module in swaps:
        setattr(parent, name, module)
    for module, layer in records:
        setattr(module, RECORD, layer)
    describe_on_config(model)
    totals = saved.totals
    summary = LoadSummary(saved.folder, len(saved.layers), totals["factored"], totals["dense"], totals["skipped"],
                          totals["latent"], totals["attention"])
    log.info("loaded %d layers (%d factored, %d latent-KV projections of %d attention blocks) from %s", summary.layers,
             summary.factored, summary.latent, summary.attention, saved.folder)
    return summary
