"""A causal LM's forward compiled with the ``lowrank`` backend: compile it once, find its options, compress it.

``model.generate`` calls ``model.forward``, so generation compiles the forward
(a compiled *module*'s ``generate`` would run eagerly). The model is compressed
by the forward's first compiled call; a :class:`~lrcompile.runtime.LatentKVCache`
needs the latent ranks before that call, so it triggers the compression itself.
"""

from __future__ import annotations

import functools
import logging
import types
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lrcompile.config import LowRankConfig
from lrcompile.errors import CalibrationError, LowRankConfigError
from lrcompile.modules import model_latent_attention

log = logging.getLogger(__name__)


def compile_forward(model: nn.Module, config: LowRankConfig) -> None:
    """``model.forward = torch.compile(model.forward, backend="lowrank")``, unless it is compiled already.

    The forward compiled is a copy with a code object of its own (:func:`_own_code`)."""
    if not hasattr(model.forward, "_torchdynamo_orig_callable"):
        model.forward = torch.compile(_own_code(model.forward), backend="lowrank", options=config)


def _own_code(forward: Any) -> Any:
    """``forward`` rebound to a copy of its function that has a code object of its own.

    Dynamo keeps compiled graphs, and counts recompiles against ``recompile_limit`` (8), per code object, and
    never drops the entries of a model that died. Every instance of a class (and, through transformers'
    decorators, every class) shares one forward code object, so after two or three models compiled and run in
    one process the next would hit the limit and run eagerly. A copy per model gives each its own cache, freed
    with the model.
    """
    function = getattr(forward, "__func__", None)
    if not isinstance(function, types.FunctionType):
        return forward
    copy = types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)
    functools.update_wrapper(copy, function)
    copy.__kwdefaults__ = function.__kwdefaults__
    return types.MethodType(copy, forward.__self__)


def compiled_options(model: nn.Module) -> LowRankConfig | None:
    """The options ``model.forward`` was compiled with under ``backend="lowrank"``, or None.

    torch.compile keeps them on the compiled function's Dynamo context, read
    here through its (private) backend chain; tests pin the torch versions it was checked on.
    """
    for cell in getattr(model.forward, "__closure__", None) or ():
        backend = getattr(getattr(cell.cell_contents, "callback", None), "_torchdynamo_orig_backend", None)
        while backend is not None:
            if getattr(backend, "compiler_name", None) == "lowrank":
                return LowRankConfig.from_options(getattr(backend, "kwargs", {}).get("options"))
            backend = getattr(backend, "_torchdynamo_orig_backend", None)
    return None


def has_latent_attention(model: nn.Module) -> bool:
    return next(model_latent_attention(model), None) is not None


def forward_kwargs(batch: Any) -> dict[str, Any]:
    """A calibration batch as the model's keyword arguments: a dict as it is, a tensor (or the first item of a
    tuple / list) as ``input_ids``, the forms ``LowRankConfig.calibration`` accepts."""
    if isinstance(batch, Mapping):
        return dict(batch)
    if isinstance(batch, (tuple, list)):
        return {"input_ids": batch[0]}
    return {"input_ids": batch}


def check_calibration_batches(batches: Any, vocab_size: int | None) -> None:
    """Refuse calibration batches that cannot run, naming the batch, before they reach the model (whose own
    errors are a bare ``NotImplementedError`` or ``IndexError``): text not yet tokenized, tensors on the meta
    device (no data), and, where the ids index an embedding of ``vocab_size`` rows, floating-point ids or ids
    outside ``[0, vocab_size)``; and batches whose ``attention_mask`` marks no real token at all."""
    masks = []
    for index, batch in enumerate(batches):
        kwargs = forward_kwargs(batch)
        masks.append(kwargs.get("attention_mask"))
        for key, value in kwargs.items():
            if isinstance(value, (str, bytes)) or (isinstance(value, (list, tuple)) and value
                                                   and isinstance(value[0], str)):
                raise CalibrationError(f"calibration batch {index} gives {key} as text: tokenize it with the "
                                       "model's own tokenizer first (batches are tensors or dicts of tensors)")
            if isinstance(value, torch.Tensor) and value.is_meta:
                raise CalibrationError(f"calibration batch {index} gives {key} on the meta device, which holds no "
                                       "data: give real tensors (on the CPU or the model's device)")
        ids = kwargs.get("input_ids")
        if not vocab_size or not isinstance(ids, torch.Tensor) or not ids.numel():
            continue
        if ids.is_floating_point() or ids.is_complex():
            raise CalibrationError(f"calibration batch {index} gives input_ids of dtype {ids.dtype}: token ids are "
                                   "integers (torch.long), as the model's tokenizer returns them")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            raise CalibrationError(f"calibration batch {index} holds token id {high if high >= vocab_size else low}, "
                                   f"outside the model's vocabulary [0, {vocab_size}): tokenize with the model's "
                                   "own tokenizer")
    if masks and all(isinstance(m, torch.Tensor) and not m.is_meta and not bool(m.any()) for m in masks):
        raise CalibrationError(f"the attention_mask of every calibration batch ({len(masks)}) is all zeros: it marks "
                               "no real token, so there is nothing to calibrate on (1 marks a token, 0 padding)")


def warn_thin_calibration(batches: Any, in_features: int, layer: str) -> None:
    """Warn when the batches hold fewer real tokens than ``layer``'s ``in_features`` inputs (the widest that is
    whitened or quantised): its Gram ``X^T X`` is then singular, and the fit sees only the directions they span."""
    tokens = 0
    for batch in batches:
        kwargs = forward_kwargs(batch)
        mask, ids = kwargs.get("attention_mask"), kwargs.get("input_ids")
        if isinstance(mask, torch.Tensor):
            tokens += int(mask.sum())
        elif isinstance(ids, torch.Tensor):
            tokens += ids.numel()
        else:
            return  # not token batches: rows cannot be counted here
    if tokens < in_features:
        log.warning("calibration holds %d real tokens, fewer than the %d inputs of %s: its statistics X^T X are "
                    "singular and the factors fit only the directions those tokens span; give at least %d tokens "
                    "(whitening papers use hundreds of thousands)", tokens, in_features, layer, in_features)


def compress_on_first_call(model: nn.Module, config: LowRankConfig, fallback_batch: Any = None) -> None:
    """Run the compiled forward once (``use_cache=False``) on the first calibration batch, or on
    ``fallback_batch`` when the options give none, so that the backend compresses the model."""
    first = config.calibration[0] if config.calibration else fallback_batch
    if first is None:
        raise LowRankConfigError(f"compressing {type(model).__name__} needs option 'calibration' (model inputs)")
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    check_calibration_batches(config.calibration or [first], vocab_size)
    log.info("compressing %s on its first compiled call (kv_ratio %s)", type(model).__name__, config.kv_ratio)
    with torch.no_grad():
        model(**forward_kwargs(first), use_cache=False)
