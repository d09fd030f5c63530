"""transformers integration: a compressed model saves with ``save_pretrained`` and loads with ``from_pretrained``.

Like transformers' quantizers (AQLM, BitNet), a compressed model's folder is
an ordinary checkpoint: ``model.safetensors`` holds the state dict of the
compressed modules (factors ``down``/``up`` and what stays dense), and
``config.json`` a ``quantization_config`` with ``quant_method: "lowrank"``
describing each compressed module (:class:`LowRankQuantizationConfig`). The
backend keeps that description on ``model.config`` whenever it installs
modules. Importing :mod:`lrcompile` registers the config and
:class:`LowRankHfQuantizer`, so ``AutoModelForCausalLM.from_pretrained(dir)``
replaces the described linears by their compressed modules on the meta device,
before any weight is allocated: the dense weights never exist and nothing is calibrated.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .errors import SavedPlanError
from .types import AQRecord, AQSpec, CompressedLayer, LatentAttention, LayerPlan, LayerStatus, dtype_from_name, dtype_name

log = logging.getLogger(__name__)

METHOD = "lowrank"
VERSION = 1
_LATENT_KEYS = ("method", "group_size", "num_heads", "num_kv_heads", "head_dim", "k_rank", "v_rank", "dense_bytes",
                "k_truncation_loss", "v_truncation_loss")


class LowRankQuantizationConfig(QuantizationConfigMixin):
    """``quantization_config`` of a compressed model: ``linears`` maps each linear's module path to its
    outcome (``status`` factored / dense / latent_kv / aq, ``rank``, shape, ``bias``, method, scores, and
    ``aq``: the AQLM shape and figures of a quantised weight or factor pair),
    ``attention`` each restructured block to its latent-KV record and its ``k_proj`` / ``v_proj`` paths."""

    def __init__(self, linears: dict[str, dict[str, Any]] | None = None,
                 attention: dict[str, dict[str, Any]] | None = None, version: int = VERSION, **kwargs: Any):
        self.quant_method = METHOD
        self.version = version
        self.linears = dict(linears or {})
        self.attention = dict(attention or {})

    @classmethod
    def of_model(cls, model: nn.Module) -> LowRankQuantizationConfig:
        """The description of every compressed module of ``model``."""
        from .modules import GroupedLowRankProjection, compressed_modules, current_record

        linears: dict[str, dict[str, Any]] = {}
        attention: dict[str, dict[str, Any]] = {}
        for path, module in compressed_modules(model):
            record = current_record(module)
            if isinstance(module, GroupedLowRankProjection):
                entry = attention.setdefault(record.name, {key: getattr(record, key) for key in _LATENT_KEYS})
                entry["dtype"] = dtype_name(record.dtype)
                entry[f"{module.role}_proj"] = path
                entry[f"{module.role}_bias"] = module.bias is not None
                entry["in_features"] = module.in_features
                continue
            plan = record.plan
            linears[path] = {
                "status": record.status.value, "method": record.method, "rank": plan.rank,
                "out_features": plan.out_features, "in_features": plan.in_features,
                "bias": getattr(module, "bias", None) is not None, "reason": plan.reason,
                "sensitivity": plan.sensitivity, "truncation_loss": plan.truncation_loss,
                "dense_bytes": record.dense_bytes, "dtype": dtype_name(record.dtype),
            }
            if record.quantization is not None:
                aq = record.quantization
                linears[path]["aq"] = {"codebooks": aq.spec.codebooks, "bits": aq.spec.bits,
                                       "group_size": aq.spec.group_size, "bits_per_weight": aq.bits_per_weight,
                                       "output_error": aq.output_error, "fit_seconds": aq.fit_seconds}
        return cls(linears, attention)


def describe_on_config(model: nn.Module) -> None:
    """Keep ``model.config.quantization_config`` describing the model's compressed modules (for ``save_pretrained``).

    A model loaded through another quantizer whose weights are plain tensors once loaded (a GGUF file,
    dequantized by transformers) is saved as what it now is, a lowrank-compressed model.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return
    config.quantization_config = LowRankQuantizationConfig.of_model(model)
    if getattr(model, "hf_quantizer", None) is not None and not isinstance(model.hf_quantizer, LowRankHfQuantizer):
        model.hf_quantizer = LowRankHfQuantizer(config.quantization_config)
        model.quantization_method = METHOD


def _slot(model: nn.Module, path: str, what: str) -> tuple[nn.Module, str, nn.Module]:
    parent_path, _, name = path.rpartition(".")
    try:
        parent = model.get_submodule(parent_path)
        module = getattr(parent, name)
    except AttributeError:
        raise SavedPlanError(
            f"quantization_config names {what} {path!r}, which {type(model).__name__} does not have: was the folder "
            "saved from another architecture?"
        ) from None
    return parent, name, module


def _linear_dims(module: nn.Module, path: str, entry: dict[str, Any]) -> None:
    shape = (entry["out_features"], entry["in_features"])
    weight = getattr(module, "weight", None)
    dims = None if weight is None else tuple(weight.shape[::-1]) if isinstance(module, Conv1D) else tuple(weight.shape)
    if dims != shape:
        raise SavedPlanError(f"quantization_config: {path!r} is {list(shape)} (out, in), the model's module "
                             f"{type(module).__name__} holds {None if dims is None else list(dims)}")


def _build_linear(model: nn.Module, path: str, entry: dict[str, Any]) -> None:
    """Put the empty compressed module ``entry`` describes at ``path`` (or its record on the dense linear)."""
    from .modules import RECORD, AQLinear, AQLowRankLinear, LowRankLinear

    parent, name, module = _slot(model, path, "the linear")
    _linear_dims(module, path, entry)
    status = LayerStatus(entry["status"])
    plan = LayerPlan(path, entry["out_features"], entry["in_features"], entry["rank"], entry["reason"],
                     entry["sensitivity"], entry["truncation_loss"])
    record = CompressedLayer(plan, entry["method"], status, _saved_dtype(entry, module.weight.dtype, path),
                             entry["dense_bytes"])
    dtype, device = module.weight.dtype, module.weight.device
    aq = entry.get("aq")
    if aq is not None:
        spec = AQSpec(aq["codebooks"], aq["bits"], aq["group_size"])
        record.quantization = AQRecord(spec, aq["bits_per_weight"], aq["output_error"], aq["fit_seconds"])
        if status is LayerStatus.FACTORED:
            down = AQLinear(plan.in_features, plan.rank, spec, False, None, dtype, device)
            up = AQLinear(plan.rank, plan.out_features, spec, entry["bias"], None, dtype, device)
            setattr(parent, name, AQLowRankLinear(down, up, record))
        else:
            setattr(parent, name, AQLinear(plan.in_features, plan.out_features, spec, entry["bias"], record,
                                           dtype, device))
    elif status is LayerStatus.FACTORED:
        setattr(parent, name, LowRankLinear(plan.in_features, plan.out_features, plan.rank, entry["bias"], record,
                                            dtype, device))
    else:
        setattr(module, RECORD, record)


def build_compressed_modules(model: nn.Module, config: LowRankQuantizationConfig) -> None:
    """Replace the linears ``config`` describes by empty compressed modules (same dtype and device,
    the meta device under ``from_pretrained``) and attach the records of those kept dense."""
    from .modules import GroupedLowRankProjection

    if config.version != VERSION:
        raise SavedPlanError(f"quantization_config version {config.version} is not readable by this lrcompile "
                             f"(it reads version {VERSION})")
    for path, entry in config.linears.items():
        try:
            _build_linear(model, path, entry)
        except (KeyError, TypeError, ValueError) as err:
            what = f"no {err}" if isinstance(err, KeyError) else str(err)
            raise SavedPlanError(f"quantization_config entry of linear {path!r} is damaged ({what}): config.json "
                                 "was not written by this lrcompile or has been edited") from err
    for block, entry in config.attention.items():
        k_parent, k_name, k_dense = _slot(model, entry["k_proj"], "the K projection")
        v_parent, v_name, v_dense = _slot(model, entry["v_proj"], "the V projection")
        dtype, device = k_dense.weight.dtype, k_dense.weight.device
        record = LatentAttention(name=block, dtype=_saved_dtype(entry, dtype, block),
                                 **{key: entry[key] for key in _LATENT_KEYS})
        for parent, name, role in ((k_parent, k_name, "k"), (v_parent, v_name, "v")):
            setattr(parent, name, GroupedLowRankProjection(entry["in_features"], record, role, entry[f"{role}_bias"],
                                                           dtype, device))
    log.info("built %d factored linears, %d AQ-quantised ones and %d latent attention blocks from the "
             "quantization_config", sum(e["status"] == LayerStatus.FACTORED.value for e in config.linears.values()),
             sum("aq" in e for e in config.linears.values()), len(config.attention))


def restore_codebook_storage(model: nn.Module) -> None:
    """AQ codebooks back in their 16-bit storage dtype (:func:`~lrcompile.kernels.aq_linear.codebook_dtype` of the
    scales'): a folder saved before codebooks were stored in 16 bits holds them in float32, and
    ``from_pretrained(dtype=...)`` may have cast them to the model's dtype."""
    from .kernels.aq_linear import codebook_dtype
    from .modules import AQLinear, AQLowRankLinear, compressed_modules

    for _, module in compressed_modules(model):
        if isinstance(module, (AQLinear, AQLowRankLinear)):
            for part in [module] if isinstance(module, AQLinear) else [module.down, module.up]:
                stored = codebook_dtype(part.scales.dtype)
                if part.codebooks.dtype != stored:
                    part.codebooks = nn.Parameter(part.codebooks.detach().to(stored), requires_grad=False)


def _saved_dtype(entry: dict[str, Any], default: torch.dtype, where: str) -> torch.dtype:
    """The dtype a record's ``dense_bytes`` were counted in when saved (older folders: the loading model's)."""
    name = entry.get("dtype")
    if name is None:
        return default
    dtype = dtype_from_name(str(name))
    if dtype is None:
        raise SavedPlanError(f"quantization_config: {where!r} has dtype {name!r}, which is not a torch dtype")
    return dtype


def _skip_parent_init(model: nn.Module) -> None:
    """Keep transformers' weight initialisation off the parents of compressed modules.

    ``from_pretrained`` calls the model's ``_init_weights`` on every module, and some architectures reach from a
    parent into a child's ``.weight`` there (GPT-2 rescales ``c_proj.weight`` of each attention and MLP block),
    which a factored or quantised module does not have. Such a parent's own init touches only its children, whose
    tensors the checkpoint holds, so a parent without parameters or buffers of its own is marked initialised.
    """
    from .modules import compressed_modules

    for path, module in compressed_modules(model):
        if hasattr(module, "weight"):  # a linear kept dense: any init reaching it finds its weight
            continue
        parent = model.get_submodule(path.rpartition(".")[0])
        if next(parent.parameters(recurse=False), None) is None and next(parent.buffers(recurse=False), None) is None:
            parent._is_hf_initialized = True


class LowRankHfQuantizer(HfQuantizer):
    """Loads a folder saved from a compressed model: builds the compressed modules before the weights load."""

    requires_calibration = True  # only pre-compressed folders: compression itself is the lowrank backend's job
    quantization_config: LowRankQuantizationConfig

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        config = self.quantization_config
        if not config.linears and not config.attention:  # saved folders describe every linear, dense ones too
            raise SavedPlanError("quantization_config (quant_method 'lowrank') describes no layer: its 'linears' "
                                 "and 'attention' entries are missing or empty, so config.json is damaged")
        build_compressed_modules(model, config)
        _skip_parent_init(model)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        restore_codebook_storage(model)
        # transformers refuses .half() / .float() on a model flagged quantized; a compressed model casts like the
        # model it was compressed from (factors and codebooks are floats, codes integers that casts leave alone)
        model.is_quantized = False
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def register() -> None:
    """Register the ``lowrank`` quantization method with transformers (once per process)."""
    if METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantization_config(METHOD)(LowRankQuantizationConfig)
        register_quantizer(METHOD)(LowRankHfQuantizer)


register()
