"""Process-wide record of compressed layers, keyed by the model's own dense weights.

The backend sees a model only through its captured graphs, whose weight
placeholders are the model's parameter tensors. Keying records by those
tensors (weakly, by identity) lets every later graph of the same model, a
recompile, a graph break, a report or a save find the layer's outcome, and
lets a loaded plan stand in for calibration.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from lrcompile.types import CompressedLayer, LatentAttention, LayerStatus

_RECORDS: WeakIdKeyDictionary = WeakIdKeyDictionary()
_LATENT: WeakIdKeyDictionary = WeakIdKeyDictionary()  # keyed by the block's dense K weight


def record_layer(weight: torch.Tensor, layer: CompressedLayer) -> None:
    _RECORDS[weight] = layer


def recorded_layer(weight: torch.Tensor) -> CompressedLayer | None:
    """The outcome recorded for this weight, if it was factored or planned dense (skips are recomputed)."""
    layer = _RECORDS.get(weight)
    return layer if layer is not None and layer.status is not LayerStatus.SKIPPED else None


def record_latent(k_weight: torch.Tensor, layer: LatentAttention) -> None:
    _LATENT[k_weight] = layer


def recorded_latent(k_weight: torch.Tensor) -> LatentAttention | None:
    """The latent-attention restructure recorded for the block whose K projection has this weight."""
    return _LATENT.get(k_weight)


def model_latent_attention(model: nn.Module) -> Iterator[tuple[str, LatentAttention]]:
    """``(K weight's parameter name, record)`` for every restructured attention block of ``model``."""
    for name, param in model.named_parameters(remove_duplicate=False):
        layer = _LATENT.get(param)
        if layer is not None:
            yield name, layer


def model_layers(model: nn.Module) -> Iterator[tuple[str, CompressedLayer]]:
    """``(parameter name, record)`` for every recorded weight of ``model``, in parameter order."""
    for name, param in model.named_parameters(remove_duplicate=False):
        layer = _RECORDS.get(param)
        if layer is not None:
            yield name, layer


def weight_bytes(model: nn.Module) -> int:
    """Bytes actually allocated for the model's parameters plus the factors that replace them."""
    storages = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        storage = param.untyped_storage()
        storages[storage.data_ptr() or id(storage)] = storage.nbytes()
        layer = _RECORDS.get(param)
        if layer is not None and layer.down is not None:
            for factor in (layer.down, layer.up):
                storages[factor.untyped_storage().data_ptr()] = factor.untyped_storage().nbytes()
        latent = _LATENT.get(param)
        if latent is not None:
            for factor in (latent.k_down, latent.k_up, latent.k_bias, latent.v_down, latent.o_weight, latent.o_bias):
                if factor is not None:
                    storages[factor.untyped_storage().data_ptr()] = factor.untyped_storage().nbytes()
    return sum(storages.values())
