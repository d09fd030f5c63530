"""Typed records shared by the front, the passes and the runtime.

This module imports nothing else of the project, so `lrcompile.passes` and
`lrcompile.runtime` can depend on it without pulling in the backend.
Analysis results live on the FX node they describe, under
``node.meta[META_KEY]``, as a :class:`LinearMeta`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, Literal

import torch

META_KEY = "lowrank"
FACTOR_OF_KEY = "lowrank_factor_of"  # on the nodes a rewrite put in a layer's place: the layer's name

FactorMethod = Literal["svd", "asvd", "whiten"]
AllocationMethod = Literal["uniform", "sensitivity", "closed_form"]
FACTOR_METHODS: tuple[str, ...] = ("svd", "asvd", "whiten")
ALLOCATION_METHODS: tuple[str, ...] = ("uniform", "sensitivity", "closed_form")
KV_ALLOCATION_METHODS: tuple[str, ...] = ("uniform", "closed_form", "fisher", "sensitivity")


class WeightLayout(enum.Enum):
    """How a matmul node holds its weight."""

    LINEAR = "linear"  # F.linear(x, W[out, in], b)
    ADDMM = "addmm"  # torch.addmm(b, x2d, W[in, out]) (HF Conv1D, GPT-2)
    MODULE = "module"  # call_module of an nn.Linear (symbolic_trace)


def dtype_name(dtype: torch.dtype) -> str:
    """How a saved folder names a dtype (``"float32"``); :func:`dtype_from_name` reads it back."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype | None:
    """The torch dtype a saved name stands for; None when it names none."""
    dtype = getattr(torch, name, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64 for statistics and SVDs, on the device that holds the tensors; float32 where it has no float64 (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


@dataclass
class ActivationStats:
    """Statistics of a linear layer's input rows, accumulated in float64 on the activations' device.

    ``mean_abs`` feeds ASVD's scaling (arXiv 2312.05821, Eq. 3), ``gram`` is
    X^T X for SVD-LLM's whitening (arXiv 2403.07378, Eq. 5). The tensors start
    on the CPU and move to the device of the first rows added (float32 where the
    device has no float64, see :func:`accumulation_dtype`).
    """

    abs_sum: torch.Tensor  # [in]
    abs_max: torch.Tensor  # [in]
    gram: torch.Tensor | None  # [in, in]; only collected when a method needs it (whitening)
    rows: int = 0

    @classmethod
    def empty(cls, in_features: int, gram: bool = True) -> ActivationStats:
        f64 = dict(dtype=torch.float64)
        return cls(
            torch.zeros(in_features, **f64),
            torch.zeros(in_features, **f64),
            torch.zeros(in_features, in_features, **f64) if gram else None,
        )

    @staticmethod
    def rows_of(x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (``[..., in]``) as rows in its device's accumulation dtype; ``token_mask`` (one flag per row,
        e.g. a flattened attention mask) drops padding rows."""
        rows = x.detach().reshape(-1, x.shape[-1]).to(accumulation_dtype(x.device))
        if token_mask is not None and token_mask.numel() == rows.shape[0]:
            rows = rows[token_mask.reshape(-1).to(device=rows.device, dtype=torch.bool)]
        return rows

    def update(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        """Add the rows of ``x`` (see :meth:`rows_of`)."""
        self.add_rows(self.rows_of(x, token_mask))

    def add_rows(self, rows: torch.Tensor) -> None:
        """Add rows ``[n, in]`` (from :meth:`rows_of`)."""
        if self.abs_sum.device != rows.device:
            self.abs_sum, self.abs_max = self.abs_sum.to(rows), self.abs_max.to(rows)
            self.gram = None if self.gram is None else self.gram.to(rows)
        self.abs_sum += rows.abs().sum(0)
        if rows.shape[0]:
            self.abs_max = torch.maximum(self.abs_max, rows.abs().amax(0))
        if self.gram is not None:
            self.gram.addmm_(rows.T, rows)  # in place: no [in, in] temporary per batch
        self.rows += rows.shape[0]

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.rows, 1)

    def is_finite(self) -> bool:
        tensors = [self.abs_sum, self.abs_max] + ([self.gram] if self.gram is not None else [])
        return all(bool(torch.isfinite(t).all()) for t in tensors)

    def check(self, layer: str) -> None:
        """Raise :class:`~lrcompile.errors.CalibrationError` naming ``layer`` when no row arrived or any is NaN/Inf."""
        from .errors import CalibrationError

        if not self.is_finite():
            raise CalibrationError(
                f"calibration activations entering layer {layer!r} contain NaN or Inf "
                "(the first such layer in graph order); check the calibration inputs and the model's weights"
            )
        if self.rows == 0:
            raise CalibrationError(f"no calibration data reached layer {layer!r}")


@dataclass
class LinearMeta:
    """What the capture and analysis passes know about one matmul node."""

    name: str  # module path, e.g. "model.layers.0.mlp.down_proj"
    layout: WeightLayout
    out_features: int
    in_features: int
    has_bias: bool
    weight_dtype: torch.dtype
    compressible: bool = True
    skip_reason: str = ""
    stats: ActivationStats | None = None
    sensitivity: dict[float, float] = field(default_factory=dict)  # param ratio -> KL
    plan: LayerPlan | None = None  # the rank allocation's decision for this linear
    refit_rows: int = 0  # tokens of the compressed layers' outputs it was factored from (sequential calibration)
    attention_role: str = ""  # e.g. "K projection of model.layers.0.self_attn, to restructure for a latent KV cache"

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    def factored_params(self, rank: int) -> int:
        return rank * (self.out_features + self.in_features)

    @property
    def break_even_rank(self) -> int:
        """Largest rank whose factors still hold fewer parameters than the dense weight."""
        return (self.dense_params - 1) // (self.out_features + self.in_features)


@dataclass(frozen=True)
class LayerPlan:
    """The decision for one linear: a rank, or dense with a reason."""

    name: str
    out_features: int
    in_features: int
    rank: int | None  # None: left dense
    reason: str = ""
    sensitivity: float | None = None  # KL at the chosen ratio (sensitivity allocation)
    truncation_loss: float | None = None  # dropped energy / total energy of the scaled weight

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    @property
    def params_after(self) -> int:
        if self.rank is None:
            return self.dense_params
        return self.rank * (self.out_features + self.in_features)


@dataclass(frozen=True)
class CompressionPlan:
    """Ranks for every compressible linear of a graph, meeting a parameter budget."""

    method: str
    allocation: str
    param_ratio: float
    layers: tuple[LayerPlan, ...]

    @property
    def dense_params(self) -> int:
        return sum(layer.dense_params for layer in self.layers)

    @property
    def params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    @property
    def achieved_ratio(self) -> float:
        return self.params_after / max(self.dense_params, 1)

    def layer(self, name: str) -> LayerPlan:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)


class LayerStatus(enum.Enum):
    FACTORED = "factored"
    DENSE = "dense"  # planned dense: factoring would not save parameters at its rank
    SKIPPED = "skipped"  # not compressible (pattern, tied weight, unrecognised form)
    LATENT = "latent_kv"  # K/V/output projection of an attention block restructured for a latent KV cache
    QUANTIZED = "aq"  # kept at full rank, its weight quantised (AQLM); a factored layer's factors are quantised instead


@dataclass(frozen=True)
class AQSpec:
    """AQLM's shape (arXiv 2401.06118, Eq. 2): ``codebooks`` (M) codebooks of ``2^bits`` codewords of
    ``group_size`` (g) weights; ``M * B`` bits of codes per group of ``g`` weights."""

    codebooks: int
    bits: int
    group_size: int

    @property
    def name(self) -> str:
        """``"MxB"``, e.g. ``"2x8"``."""
        return f"{self.codebooks}x{self.bits}"

    @property
    def code_dtype(self) -> torch.dtype:
        """``uint8`` for ``B <= 8``, else ``int16`` (holding a code's low 16 bits)."""
        return torch.uint8 if self.bits <= 8 else torch.int16

    @property
    def code_bits_per_weight(self) -> float:
        return self.codebooks * self.bits / self.group_size


@dataclass
class AQRecord:
    """How a quantised matrix (a weight, or each factor of a factored layer) is stored, and what it costs.

    ``bits_per_weight``: measured bytes of codes, codebooks and scales, times 8, over the
    parameters they stand for. ``output_error``: ``tr(dW XX^T dW^T) / tr(W XX^T W^T)`` of the
    layer's whole weight against the dense one on calibration data (AQLM Eq. 3; for a
    factored layer it includes the truncation).
    """

    spec: AQSpec
    bits_per_weight: float
    output_error: float | None = None
    fit_seconds: float = 0.0


@dataclass
class CompressedLayer:
    """The outcome for one linear, held by the module it describes (``lrcompile.modules``).

    Factored: a ``LowRankLinear`` holds it with its factors ``down`` B ``[rank, in]``
    and ``up`` A ``[out, rank]``. Planned dense, or the output projection of latent
    attention: the ``nn.Linear`` itself holds it, so a later compile does not calibrate it again.
    """

    plan: LayerPlan
    method: str
    status: LayerStatus
    dtype: torch.dtype
    dense_bytes: int = 0  # bytes of the dense weight before compression
    options: Mapping[str, Any] | None = None  # the options that decided it (LowRankConfig.deciding_options); None: loaded
    quantization: AQRecord | None = None  # the weight (status QUANTIZED) or the factors (FACTORED) are AQLM codes

    @property
    def name(self) -> str:
        return self.plan.name


@dataclass
class LatentAttention:
    """One attention block restructured for a latent KV cache (Palu, arXiv 2407.21118).

    K and V projections are factored per group of ``group_size`` KV heads
    (group-head low-rank decomposition, Palu Sec. 3.2): ``K_g = U^k_g (D^k_g x)``.
    Only the latents ``D^k x`` (``groups * k_rank`` values) and ``D^v x``
    (``groups * v_rank``) are cached. The factors live on the block's K and V
    projections (``GroupedLowRankProjection``), which both hold this record; the
    output projection stays the model's own linear.
    """

    name: str  # e.g. "model.layers.0.self_attn"
    method: str
    group_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    k_rank: int  # per group
    v_rank: int  # per group
    dtype: torch.dtype
    dense_bytes: int = 0  # k and v weights before
    k_truncation_loss: float | None = None  # dropped energy share, group mean (whiten: in kv_metrics' metric)
    v_truncation_loss: float | None = None
    options: Mapping[str, Any] | None = None  # as on CompressedLayer

    @property
    def groups(self) -> int:
        return self.num_kv_heads // self.group_size

    @property
    def itemsize(self) -> int:
        """Bytes per cached value (the model's dtype)."""
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def latent_width(self) -> int:
        """Cached values per token: ``groups * (k_rank + v_rank)``."""
        return self.groups * (self.k_rank + self.v_rank)

    @property
    def dense_width(self) -> int:
        """Values per token of the dense K and V cache: ``2 * kv_heads * head_dim``."""
        return 2 * self.num_kv_heads * self.head_dim
