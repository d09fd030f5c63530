"""The compressed model's own modules: where the outcome of compression lives.

The backend replaces each factored ``nn.Linear`` (or HF ``Conv1D``) by a
:class:`LowRankLinear` (:class:`AQLowRankLinear` when its factors are quantised,
:class:`AQLinear` for a full-rank linear whose weight is quantised, AQLM) and the K/V projections of attention restructured for a
latent KV cache by :class:`GroupedLowRankProjection`. Both are ordinary
modules: their factors are parameters (``state_dict``, ``.to()``,
``save_pretrained``), their forward is plain PyTorch (eager calls,
``torch.export``), and each holds the typed record of its outcome as
``lowrank_record``. A linear that was planned dense, or the output projection
of a restructured block, stays the model's ``nn.Linear`` with a record of its
own, so a later compile of the model reads every decision from the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lrcompile.kernels.aq_linear import codebook_dtype, dequantize
from lrcompile.kernels.grouped_projection import grouped_up_projection
from lrcompile.types import AQSpec, CompressedLayer, LatentAttention

RECORD = "lowrank_record"  # attribute of a module holding its CompressedLayer or LatentAttention


class LowRankLinear(nn.Module):
    """``y = up (down x) + bias``: a linear factored at rank ``r`` (two thin matmuls)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, record: CompressedLayer,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device), requires_grad=False)
        self.up = nn.Parameter(torch.empty(out_features, rank, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.lowrank_record = record

    @classmethod
    def from_factors(cls, down: torch.Tensor, up: torch.Tensor, bias: nn.Parameter | None,
                     record: CompressedLayer) -> LowRankLinear:
        """Wrap ``down [r, in]`` and ``up [out, r]``; ``bias`` is the replaced module's own parameter (kept, not copied)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features, module.rank = down.shape[1], up.shape[0], down.shape[0]
        module.down = nn.Parameter(down, requires_grad=False)
        module.up = nn.Parameter(up, requires_grad=False)
        module.bias = bias
        module.lowrank_record = record
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down), self.up, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


class AQLinear(nn.Module):
    """``y = x W^T + bias`` with ``W`` stored as AQLM codes (arXiv 2401.06118, Eq. 2): ``codes
    [out, in // g, M]``, ``codebooks [M, 2^B, g]``, ``scales [out]`` (format of
    :mod:`lrcompile.kernels.aq_linear`); the forward is the ``lowrank::aq_linear`` op.

    ``dtype`` is the model's: scales and bias take it, the codebooks its 16-bit storage dtype
    (:func:`~lrcompile.kernels.aq_linear.codebook_dtype`: bfloat16 for bfloat16, else float16).

    ``lowrank_record`` is its :class:`CompressedLayer` (status ``aq``) when it replaces a
    linear, None when it is a factor of an :class:`AQLowRankLinear` (which holds the record).
    """

    def __init__(self, in_features: int, out_features: int, spec: AQSpec, bias: bool,
                 record: CompressedLayer | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        groups, size = in_features // spec.group_size, 2**spec.bits
        self.codes = nn.Parameter(torch.zeros(out_features, groups, spec.codebooks, dtype=spec.code_dtype,
                                              device=device), requires_grad=False)
        self.codebooks = nn.Parameter(torch.empty(spec.codebooks, size, spec.group_size, device=device,
                                                  dtype=codebook_dtype(dtype or torch.get_default_dtype())),
                                      requires_grad=False)
        self.scales = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.lowrank_record = record

    @classmethod
    def from_codes(cls, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, bias: nn.Parameter | None,
                   record: CompressedLayer | None = None) -> AQLinear:
        """Wrap fitted tensors; ``bias`` is the replaced module's own parameter (kept, not copied)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        books, size, group = codebooks.shape
        module.spec = AQSpec(books, size.bit_length() - 1, group)
        module.out_features, module.in_features = codes.shape[0], codes.shape[1] * group
        module.codes = nn.Parameter(codes, requires_grad=False)
        module.codebooks = nn.Parameter(codebooks, requires_grad=False)
        module.scales = nn.Parameter(scales, requires_grad=False)
        module.bias = bias
        module.lowrank_record = record
        return module

    def dequantized_weight(self) -> torch.Tensor:
        """The weight ``[out, in]`` the codes stand for."""
        return dequantize(self.codes, self.codebooks, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.lowrank.aq_linear(x, self.codes, self.codebooks, self.scales, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, aq={self.spec.name}, "
                f"group_size={self.spec.group_size}, bias={self.bias is not None}")


class AQLowRankLinear(nn.Module):
    """A factored linear whose factors are quantised: ``y = up(down(x)) + bias``, ``down`` and ``up``
    :class:`AQLinear` (``[rank, in]`` and ``[out, rank]``; the bias on ``up``)."""

    def __init__(self, down: AQLinear, up: AQLinear, record: CompressedLayer):
        super().__init__()
        self.down, self.up = down, up
        self.in_features, self.out_features, self.rank = down.in_features, up.out_features, down.out_features
        self.lowrank_record = record

    @property
    def bias(self) -> nn.Parameter | None:
        return self.up.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class GroupedLowRankProjection(nn.Module):
    """A K or V projection (``role``) factored per group of KV heads (Palu Sec. 3.2): latents ``down x``
    (``[..., G * r]``, what a latent cache stores), projected up per group by ``up [G, w, r]``.

    Its forward rebuilds the dense K or V exactly from the factors, so the model's own
    attention runs unchanged in eager calls; compiled graphs attend over the latents instead.
    ``lowrank_record`` is the block's :class:`LatentAttention`, shared with the other projection.
    """

    def __init__(self, in_features: int, record: LatentAttention, role: str, bias: bool,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        rank = record.k_rank if role == "k" else record.v_rank
        self.in_features, self.role = in_features, role
        width = record.group_size * record.head_dim
        self.down = nn.Parameter(torch.empty(record.groups * rank, in_features, dtype=dtype, device=device),
                                 requires_grad=False)
        self.up = nn.Parameter(torch.empty(record.groups, width, rank, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(record.groups * width, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None
        self.lowrank_record = record

    @classmethod
    def from_factors(cls, down: torch.Tensor, up: torch.Tensor, bias: nn.Parameter | None, record: LatentAttention,
                     role: str) -> GroupedLowRankProjection:
        """Wrap ``down [G * r, in]`` and ``up [G, w, r]``; ``bias`` is the replaced module's own parameter."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.role = down.shape[1], role
        module.down = nn.Parameter(down, requires_grad=False)
        module.up = nn.Parameter(up, requires_grad=False)
        module.bias = bias
        module.lowrank_record = record
        return module

    @property
    def rank(self) -> int:
        return self.up.shape[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grouped_up_projection(F.linear(x, self.down), self.up, self.bias)

    def extra_repr(self) -> str:
        groups, width, rank = self.up.shape
        return f"role={self.role}, in_features={self.in_features}, groups={groups}, width={width}, rank={rank}"


def module_record(module: nn.Module) -> CompressedLayer | LatentAttention | None:
    return getattr(module, RECORD, None)


def held_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a module holding a record computes in: its factors', its AQ scales', or its dense weight's."""
    if isinstance(module, AQLinear):
        return module.scales.dtype
    if isinstance(module, AQLowRankLinear):
        return module.down.scales.dtype
    if isinstance(module, (LowRankLinear, GroupedLowRankProjection)):
        return module.down.dtype
    return module.weight.dtype


def current_record(module: nn.Module) -> CompressedLayer | LatentAttention:
    """The module's record as its tensors are now: ``model.to(dtype)`` casts the tensors, not the record, so
    the dtype is read from the module and the dense bytes scaled by the itemsize (the record is not changed)."""
    record = module.lowrank_record
    dtype = held_dtype(module)
    if dtype == record.dtype:
        return record
    return dataclasses.replace(record, dtype=dtype, dense_bytes=record.dense_bytes * dtype.itemsize // record.dtype.itemsize)


def compressed_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(path, module)`` of every module of ``model`` holding a compression record, in module order."""
    for name, module in model.named_modules():
        if module_record(module) is not None:
            yield name, module


LEFT_DENSE = "lowrank_left_dense"  # on an attention module kv_unmatched="warn" left dense: why
SKIPPED_PARAMETER = "lowrank_skip_reason"  # on a parameter of the model itself read by a linear: why it stays dense


def attention_left_dense(model: nn.Module) -> list[tuple[str, str]]:
    """``(block path, reason)`` of every attention block a ``kv_ratio`` compile left dense (``kv_unmatched="warn"``)."""
    return [(name, getattr(module, LEFT_DENSE)) for name, module in model.named_modules() if hasattr(module, LEFT_DENSE)]


def model_latent_attention(model: nn.Module) -> Iterator[tuple[str, LatentAttention]]:
    """``(block path, record)`` of every attention block restructured for a latent KV cache, in module order."""
    seen = set()
    for _, module in compressed_modules(model):
        record = module.lowrank_record
        if isinstance(module, GroupedLowRankProjection) and id(record) not in seen:
            seen.add(id(record))
            yield record.name, record


def factor_bytes(module: nn.Module) -> int:
    """Bytes of a compressed module's own tensors: factors, or codes, codebooks and scales (a bias is the
    replaced module's own, not counted)."""
    return sum(param.untyped_storage().nbytes() for name, param in module.named_parameters()
               if name.rpartition(".")[2] != "bias")


def weight_bytes(model: nn.Module) -> int:
    """Bytes allocated for the model's parameters (each storage once): factors plus what stays dense."""
    storages = {}
    for param in model.parameters():
        storage = param.untyped_storage()
        storages[storage.data_ptr() or id(storage)] = storage.nbytes()
    return sum(storages.values())
