"""Eager calls of a compressed model: a released dense weight is rebuilt from its factors for one module call.

Compression frees the storage of the dense weights it replaces, and the
compiled graphs never read them. An eager call still does: Dynamo falls back
to eager at its recompile limit or under ``torch.compiler.disable``, and a
user may call the model after ``torch._dynamo.reset()``. Each released
parameter carries a :class:`DenseRebuild` (as an attribute, so the state lives
on the tensor it describes); module forward hooks, registered once for the
process, refill the storage from the factors before the owning module runs and
free it again afterwards. Eager calls are therefore correct and transiently
hold one layer's dense weight, never all of them. While Dynamo traces, the
hooks do nothing (they are skipped, not traced into the graph).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

_ATTRIBUTE = "_lowrank_rebuild"


@dataclass(frozen=True)
class DenseRebuild:
    """How to rebuild one released weight: ``weight()`` in its stored layout, plus a shift added
    to the owning module's output (a bias folded elsewhere, for latent attention's output projection)."""

    weight: Callable[[], torch.Tensor]
    output_shift: torch.Tensor | None = None


_hooks: list[Any] = []  # the two process-wide hook handles, registered on first use


def mark_released(parameter: torch.Tensor, rebuild: DenseRebuild) -> None:
    """Attach ``rebuild`` to a parameter whose dense storage was (or is about to be) released."""
    setattr(parameter, _ATTRIBUTE, rebuild)
    if not _hooks:
        # The hooks do nothing on torch.compile's wrapper module (it has no parameters of its own).
        warnings.filterwarnings("ignore", message=r"Using `torch\.compile\(module\)` when there are global hooks")
        _hooks.append(nn.modules.module.register_module_forward_pre_hook(_refill))
        _hooks.append(nn.modules.module.register_module_forward_hook(_release))


def _released(module: nn.Module) -> list[tuple[torch.Tensor, DenseRebuild]]:
    found = []
    for parameter in module._parameters.values():
        rebuild = getattr(parameter, _ATTRIBUTE, None) if parameter is not None else None
        if rebuild is not None:
            found.append((parameter, rebuild))
    return found


def _refill(module: nn.Module, args: Any) -> None:
    if torch.compiler.is_compiling():
        return
    for parameter, rebuild in _released(module):
        if parameter.untyped_storage().nbytes() == 0:
            dense = rebuild.weight()
            with torch.no_grad():
                parameter.untyped_storage().resize_(parameter.numel() * parameter.element_size())
                parameter.copy_(dense.reshape(parameter.shape))
            log.debug("eager call of %s: rebuilt a released weight from its factors", type(module).__name__)


def _release(module: nn.Module, args: Any, output: Any) -> Any:
    if torch.compiler.is_compiling():
        return None
    shift = None
    for parameter, rebuild in _released(module):
        parameter.untyped_storage().resize_(0)
        if rebuild.output_shift is not None:
            shift = rebuild.output_shift
    return None if shift is None else output + shift
