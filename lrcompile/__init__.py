"""lrcompile: a torch.compile backend that compresses LLMs with activation-aware low-rank factoring.

``torch.compile(model, backend="lowrank", options={...})`` compresses every
linear of the captured graph; the pass-level API (``lrcompile.passes``) works
on any ``fx.GraphModule``. Importing this package loads the config, the
shared types, the transformers integration (``from_pretrained`` of a
compressed folder) and the ``lowrank::`` custom ops a compressed model's
graph calls (so a ``torch.export.load``-ed program of one runs); the backend
and the passes load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import LowRankConfig
from .errors import (
    CalibrationError,
    GraphBreakError,
    LatentCacheError,
    LowRankConfigError,
    LowRankError,
    NoCompressibleLinearError,
    SavedPlanError,
    WeightError,
)
from .hf_quantizer import LowRankQuantizationConfig
from .kernels import aq_linear, grouped_projection, latent_attention, latent_cache  # noqa: F401  (define the ops)
from .types import CompressedLayer, CompressionPlan, LayerPlan, LayerStatus

_LAZY = {
    "lowrank_backend": "lrcompile.backend",
    "compress_graph": "lrcompile.pipeline",
    "CompressionReport": "lrcompile.report",
    "model_report": "lrcompile.report",
    "weight_bytes": "lrcompile.modules",
    "LowRankLinear": "lrcompile.modules",
    "GroupedLowRankProjection": "lrcompile.modules",
    "load_compressed": "lrcompile.runtime.saved_model",
    "LatentKVCache": "lrcompile.runtime.latent_cache",
    "generate": "lrcompile.runtime.generation",
    "compress_model_blocks": "lrcompile.block_compression",
    "distill_model": "lrcompile.block_compression",
}

__all__ = [
    "CalibrationError",
    "CompressedLayer",
    "CompressionPlan",
    "GraphBreakError",
    "LayerPlan",
    "LatentCacheError",
    "LayerStatus",
    "LowRankQuantizationConfig",
    "LowRankConfig",
    "LowRankConfigError",
    "LowRankError",
    "NoCompressibleLinearError",
    "SavedPlanError",
    "WeightError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lrcompile' has no attribute {name!r}")
