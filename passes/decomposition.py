"""Truncated SVD of a weight in a space chosen by its input activations.

Every method factors ``W T = U diag(s) V^T`` for an input transform ``T`` and
maps back, ``W ~ U_k diag(s_k) V_k^T T^-1``:

* ``svd``: ``T = I`` (Eckart-Young on the weight alone).
* ``asvd``: ``T = diag(mean|x|^alpha)`` (ASVD, arXiv 2312.05821, Eq. 3-4), so
  channels with large activations (outliers) are kept by the truncation.
* ``whiten``: ``T = L`` with ``L L^T = X^T X`` (SVD-LLM, arXiv 2403.07378,
  Eq. 5-6). Then ``||(W - W_k) X^T||_F^2 = sum_{i>k} s_i^2``: the truncation
  loss is exactly the dropped squared singular values (Theorem 3.2).
* ``whiten`` with a ``cross`` term (error feedback, see
  :mod:`lrcompile.passes.sequential_calibration`): the weight is refit to
  inputs ``X^`` that differ from the dense inputs ``X``. With ``C = X^T X^ = L L^T``
  (``stats.gram``, taken on ``X^``) and ``B = X^T X^`` (``cross``),
  ``||X W^T - X^ Wh^T||_F^2 = const + ||(W* - Wh) L||_F^2`` for the least-squares
  solution ``W* = W B C^-1``, so the rank-k optimum truncates the SVD of
  ``W* L`` and maps back by ``L^-1``. With ``X^ = X`` (``B = C``), ``W* = W``: plain
  whitening. ``W* - W`` regresses the upstream error on ``X^`` with ``in``
  regressors, which overfits a few thousand calibration rows (SmolLM2 at param
  ratio 0.9: held-out perplexity 82 against 62 independent), so ``W*`` is the ridge
  solution ``W (B + l I)(C + l I)^-1`` (``l = ridge * mean(diag C)``, the minimiser of
  ``||X W^T - X^ Wh^T||^2 + l ||Wh - W||^2``), still truncated in ``C``'s metric.

All arithmetic is float64 on the weight's device (float32 where it has none),
whatever the weight dtype; factors come back there, in the weight's dtype, with
``sqrt(s)`` folded into each side.
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass

import torch

from lrcompile.errors import CalibrationError, LowRankConfigError, WeightError
from lrcompile.types import FACTOR_METHODS, ActivationStats, accumulation_dtype

log = logging.getLogger(__name__)

ASVD_MIN_SCALE = 1e-6  # relative floor for dead input channels (mean|x| = 0)
FEEDBACK_RIDGE = 0.1  # error feedback's ridge over mean(diag C); measured on SmolLM2 at 0.9: 0 -> 82.2, 0.01 -> 63.3, 0.1 -> 61.3


@dataclass
class LinearDecomposition:
    """``W = u diag(s) vt`` exactly at full rank; ``vt`` already carries ``T^-1``."""

    u: torch.Tensor  # [out, r] float64
    s: torch.Tensor  # [r] float64, descending
    vt: torch.Tensor  # [r, in] float64

    @property
    def full_rank(self) -> int:
        return self.s.numel()

    def factors(self, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(down [rank, in], up [out, rank])`` with ``up @ down ~ W``; ``rank`` in ``[1, full_rank]``."""
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 1 <= rank <= self.full_rank:
            raise ValueError(f"rank={rank!r}: expected an integer in [1, {self.full_rank}] (the weight's full rank)")
        root = self.s[:rank].sqrt()
        down = root[:, None] * self.vt[:rank]
        up = self.u[:, :rank] * root[None, :]
        return down.to(dtype).contiguous(), up.to(dtype).contiguous()

    def reconstruct(self, rank: int, dtype: torch.dtype) -> torch.Tensor:
        return ((self.u[:, :rank] * self.s[:rank]) @ self.vt[:rank]).to(dtype)

    def truncation_loss(self, rank: int) -> float:
        """Dropped energy over total energy of ``W T``: ``sum_{i>k} s_i^2 / sum_i s_i^2``."""
        energy = self.s.square()
        return float(energy[rank:].sum() / energy.sum().clamp_min(1e-300))


def regularized_cholesky(gram: torch.Tensor, layer: str, shift: float = 0.0) -> torch.Tensor:
    """Lower Cholesky factor of ``gram + shift I``, adding ``eps * mean(diag) * I`` while it is not positive definite.

    One new ``[n, n]`` buffer: the factor overwrites a column-major copy, the layout LAPACK works in."""
    scale = float(gram.diagonal().mean().clamp_min(1e-12))
    info = torch.empty((), dtype=torch.int32, device=gram.device)
    factor = torch.empty_like(gram).mT
    for eps in (0.0, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2):
        factor.copy_(gram)
        if shift or eps:
            factor.diagonal().add_(shift + eps * scale)
        torch.linalg.cholesky_ex(factor, out=(factor, info))
        if int(info) == 0 and bool(torch.isfinite(factor).all()):
            if eps:
                log.info("layer %s: Gram matrix regularised with %.0e * mean(diag)", layer, eps)
            return factor
    raise CalibrationError(f"layer {layer!r}: the Gram matrix X^T X is not positive definite even after damping")


@dataclass
class Whitening:
    """The whitened space of the linears reading one input (SVD-LLM, Eq. 5-6), built once for all of them.

    ``chol`` is ``L`` with ``L L^T = C``; the whitened target of a weight ``W`` is ``W L`` or, with error
    feedback, ``W G L`` for the ridge refit ``G = (B + l I)(C + l I)^-1`` (module docstring)."""

    chol: torch.Tensor  # [in, in] lower triangular
    refit: torch.Tensor | None = None  # G [in, in]; None for plain whitening (G = I)

    @classmethod
    def of(cls, stats: ActivationStats | None, layer: str, cross: torch.Tensor | None = None,
           ridge: float = FEEDBACK_RIDGE) -> Whitening:
        """From ``stats.gram`` (``C``) and, for error feedback, ``cross`` (``B``, float64 ``[in, in]``), which is
        overwritten by ``G``: at most three ``[in, in]`` buffers (``C``, ``B``/``G`` and one factor) are alive at once."""
        if stats is None or stats.gram is None:
            raise CalibrationError(f"layer {layer!r}: method 'whiten' needs the Gram matrix X^T X (observe with gram=True)")
        gram = stats.gram
        refit = None
        if cross is not None:  # G = (B + l I) M^-1 with M = C + l I = F F^T, solved in place in B
            shift = ridge * float(gram.diagonal().mean())
            damped = regularized_cholesky(gram, layer, shift)
            refit = cross
            refit.diagonal().add_(shift)
            torch.linalg.solve_triangular(damped.mT, refit, upper=True, left=False, out=refit)
            torch.linalg.solve_triangular(damped, refit, upper=False, left=False, out=refit)
            del damped
        return cls(regularized_cholesky(gram, layer), refit)


def shared_whitening(method: str, stats: ActivationStats | None, layer: str, cross: torch.Tensor | None = None
                     ) -> Whitening | None:
    """The :class:`Whitening` the linears reading one input share (``cross`` overwritten, see
    :meth:`Whitening.of`); None unless ``method`` whitens (``svd`` and ``asvd`` need nothing shared)."""
    return Whitening.of(stats, layer, cross) if method == "whiten" else None


def check_finite_weight(weight: torch.Tensor, layer: str) -> None:
    """Refuse a weight holding NaN or Inf by its layer's name (an SVD of it fails without one)."""
    if not bool(torch.isfinite(weight).all()):
        raise WeightError(f"layer {layer!r}: its weight holds NaN or Inf, which no factorisation can represent; "
                          "check the checkpoint (or leave the layer out with option 'exclude')")


def decompose(
    weight: torch.Tensor,
    method: str,
    stats: ActivationStats | None = None,
    alpha: float = 0.5,
    layer: str = "",
    whitening: Whitening | None = None,
    output_metric: torch.Tensor | None = None,
) -> LinearDecomposition:
    """Decompose ``weight`` ``[out, in]`` with ``method`` (``svd`` | ``asvd`` | ``whiten``).

    ``whitening``: the input's :class:`Whitening`, shared by the linears reading it (error feedback's refit
    included); by default built from ``stats``. ``output_metric`` (``whiten`` only): ``G [out, out]`` weighting
    the output error, ``tr(dW C dW^T G)``: with ``G = R R^T`` the SVD of ``R^T W L`` is truncated and ``u``
    maps back by ``R^-T`` (:mod:`lrcompile.passes.kv_metrics` builds ``G`` for latent K and V)."""
    if method not in FACTOR_METHODS:
        raise LowRankConfigError(f"layer {layer!r}: unknown factoring method {method!r}; expected one of "
                                 f"{', '.join(map(repr, FACTOR_METHODS))}")
    w = weight.detach().to(accumulation_dtype(weight.device))  # on the weight's device
    check_finite_weight(w, layer)
    if method != "svd" and stats is None and whitening is None:
        raise CalibrationError(f"layer {layer!r}: method {method!r} needs activation statistics")
    if (whitening is not None or output_metric is not None) and method != "whiten":
        raise ValueError(f"layer {layer!r}: a Whitening or output metric is for method 'whiten'; got method {method!r}")
    if method == "svd":
        u, s, vt = torch.linalg.svd(w, full_matrices=False)
    elif method == "asvd":
        scale = stats.mean_abs.to(w).pow(alpha)
        scale = scale.clamp_min(ASVD_MIN_SCALE * float(scale.max().clamp_min(1e-300)))
        u, s, vt = torch.linalg.svd(w * scale[None, :], full_matrices=False)
        vt = vt / scale[None, :]
    else:  # whiten
        whitening = whitening if whitening is not None else Whitening.of(stats, layer)
        chol = whitening.chol.to(w)
        target = w if whitening.refit is None else w @ whitening.refit.to(w)
        left = None if output_metric is None else regularized_cholesky(output_metric.to(w), f"{layer} (output metric)")
        if left is not None:
            target = left.mT @ target
        u, s, vt = torch.linalg.svd(target @ chol, full_matrices=False)
        del target
        vt = torch.linalg.solve_triangular(chol, vt, upper=False, left=False)  # vt @ L^-1
        if left is not None:
            u = torch.linalg.solve_triangular(left.mT, u, upper=True)  # R^-T u
    return LinearDecomposition(u, s, vt)
