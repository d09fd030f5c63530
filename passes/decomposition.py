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
from dataclasses import dataclass

import torch

from lrcompile.errors import CalibrationError
from lrcompile.types import ActivationStats, accumulation_dtype

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
        """``(down [rank, in], up [out, rank])`` with ``up @ down ~ W``."""
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


def _add_to_diagonal(matrix: torch.Tensor, value: float) -> torch.Tensor:
    """``matrix + value * I`` without building ``I`` (one ``[n, n]`` buffer, not three)."""
    out = matrix.clone()
    out.diagonal().add_(value)
    return out


def regularized_cholesky(gram: torch.Tensor, layer: str) -> torch.Tensor:
    """Lower Cholesky factor of ``X^T X``, adding ``eps * mean(diag) * I`` while it is not positive definite."""
    scale = float(gram.diagonal().mean().clamp_min(1e-12))
    for eps in (0.0, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2):
        damped = gram if not eps else _add_to_diagonal(gram, eps * scale)
        chol, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0 and bool(torch.isfinite(chol).all()):
            if eps:
                log.info("layer %s: Gram matrix regularised with %.0e * mean(diag)", layer, eps)
            return chol
    raise CalibrationError(f"layer {layer!r}: the Gram matrix X^T X is not positive definite even after damping")


def decompose(
    weight: torch.Tensor,
    method: str,
    stats: ActivationStats | None = None,
    alpha: float = 0.5,
    layer: str = "",
    cross: torch.Tensor | None = None,
    ridge: float = FEEDBACK_RIDGE,
) -> LinearDecomposition:
    """Decompose ``weight`` ``[out, in]`` with ``method`` (``svd`` | ``asvd`` | ``whiten``).

    ``cross``: ``B = X^T X^`` (``[in, in]`` float64) of the dense inputs ``X`` with the inputs
    ``X^`` that ``stats`` describes; whitening then fits ``W X`` from ``X^``, with ``ridge`` (module docstring)."""
    w = weight.detach().to(accumulation_dtype(weight.device))  # on the weight's device
    if method != "svd" and stats is None:
        raise CalibrationError(f"layer {layer!r}: method {method!r} needs activation statistics")
    if cross is not None and method != "whiten":
        raise ValueError(f"layer {layer!r}: the error-feedback refit (cross) is whitened least squares; got method {method!r}")
    if method == "svd":
        u, s, vt = torch.linalg.svd(w, full_matrices=False)
    elif method == "asvd":
        scale = stats.mean_abs.to(w).pow(alpha)
        scale = scale.clamp_min(ASVD_MIN_SCALE * float(scale.max().clamp_min(1e-300)))
        u, s, vt = torch.linalg.svd(w * scale[None, :], full_matrices=False)
        vt = vt / scale[None, :]
    elif method == "whiten":
        if stats.gram is None:
            raise CalibrationError(f"layer {layer!r}: method 'whiten' needs the Gram matrix X^T X (observe with gram=True)")
        gram = stats.gram.to(w)
        chol = regularized_cholesky(gram, layer)
        if cross is None:
            target = w @ chol
        else:  # W* L with W* = W (B + l I)(C + l I)^-1; C symmetric
            shift = ridge * float(gram.diagonal().mean())
            refit = w @ cross.to(w)
            refit += shift * w
            target = torch.linalg.solve(_add_to_diagonal(gram, shift), refit.T).T @ chol
            del refit
        u, s, vt = torch.linalg.svd(target, full_matrices=False)
        vt = torch.linalg.solve_triangular(chol, vt, upper=False, left=False)  # vt @ L^-1
    else:
        raise ValueError(f"unknown factoring method {method!r}")
    return LinearDecomposition(u, s, vt)
