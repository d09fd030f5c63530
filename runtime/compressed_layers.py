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

from lrcompile.types import CompressedLayer, LayerStatus

_RECORDS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def record_layer(weight: torch.Tensor, layer: CompressedLayer) -> None:
    _RECORDS[weight] = layer


def recorded_layer(weight: torch.Tensor) -> CompressedLayer | None:
    """The outcome recorded for this weight, if it was factored or planned dense (skips are recomputed)."""
    layer = _RECORDS.get(weight)
    return layer if layer is not None and layer.status is not LayerStatus.SKIPPED else None


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
    return sum(storages.values())
