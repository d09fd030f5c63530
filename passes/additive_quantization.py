"""Additive multi-codebook quantisation of one weight matrix (AQLM, arXiv 2401.06118).

Each output row of ``W [out, in]`` is split into groups of ``g`` consecutive
input weights; a group is approximated by the sum of ``M`` codewords, one from
each codebook ``C_m`` of ``2^B`` vectors of length ``g``, times the row's scale
(AQLM Eq. 2)::

    W[o, j] ~ s[o] * sum_m C_m[b[o, j, m]]

The fit minimises the layer's output error on calibration data (AQLM Eq. 3-4)::

    || W X - W^ X ||^2 = tr((W - W^) X X^T (W - W^)^T)

with the Gram matrix ``X X^T`` that activation statistics collect for whitening
(:class:`~lrcompile.types.ActivationStats`). Initialisation: per-row scales
(the rows' RMS), then residual k-means, one codebook after another (AQLM
Sec. 3.1), weighted by the Gram's diagonal, its iterations on a sample of the groups. Then alternate (AQLM Sec. 3.2, Alg. 1)
a beam search over codes, groups visited in turn, each codebook's codeword
re-chosen against the Gram-weighted error including its cross terms with the
row's other groups (Eq. 5-6), and Adam steps on codebooks and scales with the
codes fixed (Eq. 7), until the relative error improvement falls below a tolerance.
Every step works on all output rows at once.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from lrcompile.errors import LowRankConfigError
from lrcompile.kernels.aq_linear import codebook_dtype
from lrcompile.types import AQSpec

log = logging.getLogger(__name__)

_CHUNK = 1 << 22  # elements of one [rows, candidates] score block (bounds memory for 2^16 codewords)
_SEEDED = 1 << 10  # codebooks up to this size are seeded by k-means++ (one pass over the sample per codeword)
_KMEANS_SAMPLE = 1 << 15  # groups the k-means iterations run on (at least one per codeword); all are then assigned


@dataclass
class AQFit:
    """Codes ``[out, in // g, M]`` (storage dtype of :meth:`AQSpec.code_dtype`), codebooks ``[M, 2^B, g]``
    (:func:`~lrcompile.kernels.aq_linear.codebook_dtype` of the weight's dtype), scales ``[out]`` (the weight's
    dtype), and the relative output error after initialisation and after each round."""

    codes: Tensor
    codebooks: Tensor
    scales: Tensor
    errors: list[float]  # after initialisation, then after each round (float32 codebooks and scales)
    relative_error: float  # tr(dW G dW^T) / tr(W G W^T) of the returned tensors, as stored (rounded)
    seconds: float


def check_shape(spec: AQSpec, out_features: int, in_features: int, layer: str) -> None:
    """A layer can be quantised with ``spec`` only if its input width is a multiple of the group size."""
    if in_features % spec.group_size:
        raise LowRankConfigError(
            f"option 'aq_group_size'={spec.group_size} does not divide the input width {in_features} of layer {layer!r}; "
            f"choose a group size dividing it, or exclude the layer"
        )


def storage_codes(indices: Tensor, spec: AQSpec) -> Tensor:
    """Codeword indices ``int64`` as stored: ``uint8`` for ``B <= 8``, else ``int16`` holding the low 16 bits."""
    dtype = spec.code_dtype
    if dtype == torch.uint8:
        return indices.to(torch.uint8)
    return torch.where(indices >= 2**15, indices - 2**16, indices).to(torch.int16)


def relative_error(delta: Tensor, weight: Tensor, gram: Tensor) -> float:
    """``tr(dW G dW^T) / tr(W G W^T)`` (AQLM Eq. 3), in float64."""
    gram, delta, weight = gram.detach().double(), delta.detach().double(), weight.detach().double()
    return float(((delta @ gram) * delta).sum() / ((weight @ gram) * weight).sum().clamp_min(1e-300))


def _words(codebooks: Tensor, codes: Tensor) -> Tensor:
    """``sum_m C_m[codes[..., m]]``: ``codes [..., M]`` int64 to ``[..., g]``."""
    return sum(codebooks[m][codes[..., m]] for m in range(codebooks.shape[0]))


def _reconstruct(codebooks: Tensor, codes: Tensor, scales: Tensor) -> Tensor:
    out, groups, _ = codes.shape
    return (_words(codebooks, codes) * scales[:, None, None]).reshape(out, groups * codebooks.shape[2])


def _kmeans_init(points: Tensor, weights: Tensor, spec: AQSpec, iterations: int, generator: torch.Generator
                 ) -> tuple[Tensor, Tensor]:
    """Residual k-means (AQLM Sec. 3.1): codebook ``m`` clusters what codebooks ``< m`` left. ``points [N, g]``
    are the groups of the scaled rows, ``weights [N, g]`` each coordinate's weight (its row's squared scale
    times the Gram's diagonal), so the distance is the diagonal part of the output error."""
    size = 2**spec.bits
    residual = points.clone()
    books, codes = [], []
    sample = torch.randperm(len(points), generator=generator)[:max(_KMEANS_SAMPLE, size)].to(points.device)
    for _ in range(spec.codebooks):
        part, part_weights = residual[sample], weights[sample]
        weighted = part_weights * part
        centroids = _seed_centroids(part, part_weights, size, generator)
        for _ in range(iterations):
            assign = _weighted_assign(part, part_weights, weighted, centroids)
            num = torch.zeros_like(centroids).index_add_(0, assign, weighted)
            den = torch.zeros_like(centroids).index_add_(0, assign, part_weights)
            centroids = torch.where(den > 0, num / den.clamp_min(1e-30), centroids)
        assign = _weighted_assign(residual, weights, weights * residual, centroids)
        residual = residual - centroids[assign]
        books.append(centroids)
        codes.append(assign)
    return torch.stack(books), torch.stack(codes, -1)


def _seed_centroids(points: Tensor, weights: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding (each next centroid drawn with probability proportional to its squared distance to
    the nearest one so far) up to ``_SEEDED`` codewords; random points, slightly perturbed, beyond."""
    if size > _SEEDED or size >= len(points):
        pick = torch.randint(len(points), (size,), generator=generator).to(points.device)
        noise = torch.randn(size, points.shape[1], generator=generator).to(points)
        return points[pick] + 1e-3 * points.std() * noise  # distinct even where a point is picked twice
    chosen = [int(torch.randint(len(points), (1,), generator=generator))]
    nearest = (weights * (points - points[chosen[0]]) ** 2).sum(1)
    for _ in range(size - 1):
        total = nearest.sum()
        probabilities = nearest / total if total > 0 else torch.full_like(nearest, 1 / len(nearest))
        chosen.append(int(torch.multinomial(probabilities.cpu(), 1, generator=generator)))
        nearest = torch.minimum(nearest, (weights * (points - points[chosen[-1]]) ** 2).sum(1))
    return points[chosen].clone()


def _weighted_assign(points: Tensor, weights: Tensor, weighted: Tensor, centroids: Tensor) -> Tensor:
    """Nearest centroid of each point under its own diagonal metric: ``argmin_c sum_i w_i (x_i - c_i)^2``."""
    step = max(1, _CHUNK // len(centroids))
    squared, transposed = (centroids * centroids).T, centroids.T
    return torch.cat([(weights[i:i + step] @ squared - 2 * weighted[i:i + step] @ transposed).argmin(1)
                      for i in range(0, len(points), step)])


def _beam_search(target: Tensor, gram: Tensor, codebooks: Tensor, codes: Tensor, beam: int) -> Tensor:
    """One sweep of AQLM's code update (Sec. 3.2, Eq. 5-6) on the scaled weight ``target [out, in]``.

    Groups are visited in turn; for group ``j`` with the other groups fixed, the
    row's error as a function of the group's reconstruction ``q`` is
    ``q^T G_jj q - 2 q . p + const`` with ``p = (r G)_j + q_now G_jj`` (``r`` the
    row's residual): the cross terms with every other group enter through ``p``.
    A beam of ``beam`` code tuples per row is kept while each codebook's choice is
    replaced by every codeword in turn. The current codes are always a candidate,
    so the error never grows. Returns the new codes (``int64``).
    """
    books, size, g = codebooks.shape
    codes = codes.clone()
    residual_gram = (target - _reconstruct(codebooks, codes, torch.ones(len(target), dtype=target.dtype,
                                                                          device=target.device))) @ gram
    rows_per_chunk = max(1, _CHUNK // (beam * size))
    for j in range(codes.shape[1]):
        block = slice(j * g, (j + 1) * g)
        g_jj = gram[block, block]
        norms = ((codebooks @ g_jj) * codebooks).sum(-1)  # [M, K]: v^T G_jj v per codeword
        current = _words(codebooks, codes[:, j])  # [out, g]
        p = residual_gram[:, block] + current @ g_jj
        new_codes = torch.cat([_beam_group(codebooks, norms, g_jj, codes[i:i + rows_per_chunk, j],
                                           current[i:i + rows_per_chunk], p[i:i + rows_per_chunk], beam)
                               for i in range(0, len(codes), rows_per_chunk)])
        change = _words(codebooks, new_codes) - current
        residual_gram -= change @ gram[block]
        codes[:, j] = new_codes
    return codes


def _beam_group(codebooks: Tensor, norms: Tensor, g_jj: Tensor, codes: Tensor, current: Tensor, p: Tensor,
                beam: int) -> Tensor:
    """Beam search over the ``M`` codewords of one group for a block of rows; ``codes [rows, M]``."""
    rows, books = codes.shape
    size = codebooks.shape[1]
    beam_codes = codes[:, None, :].expand(rows, beam, books).clone()  # [rows, beam, M]
    beam_words = current[:, None, :].expand(rows, beam, -1).clone()  # [rows, beam, g]
    alive = torch.zeros(rows, beam, dtype=torch.bool, device=codes.device)
    alive[:, 0] = True  # the other slots fill from the first candidate's neighbours
    for m in range(books):
        others = beam_words - codebooks[m][beam_codes[..., m]]  # z: the group without codebook m's word
        others_g = others @ g_jj
        base = ((others_g - 2 * p[:, None]) * others).sum(-1)  # z G z - 2 z.p
        scores = base[..., None] + norms[m] + 2 * (others_g - p[:, None]) @ codebooks[m].T  # [rows, beam, K]
        scores = scores.masked_fill(~alive[..., None], math.inf).reshape(rows, beam * size)
        best, index = scores.topk(beam, dim=1, largest=False)
        origin, word = index // size, index % size
        beam_codes = beam_codes.gather(1, origin[..., None].expand(-1, -1, books)).clone()
        beam_codes[..., m] = word
        beam_words = others.gather(1, origin[..., None].expand(-1, -1, others.shape[-1])) + codebooks[m][word]
        alive = torch.isfinite(best)
    return beam_codes[:, 0]  # topk sorts ascending: slot 0 is the best tuple


def _adam(target: Tensor, gram: Tensor, codebooks: Tensor, scales: Tensor, codes: Tensor, steps: int, lr: float
          ) -> tuple[Tensor, Tensor]:
    """Adam on codebooks and scales with the codes fixed (AQLM Sec. 3.2, Eq. 7), minimising
    ``tr(dW G dW^T)``. The gradient is written out (``dL/dW^ = -2 dW G``, then through
    ``W^ = s * sum_m C_m[b_m]``): one ``[out, in] x [in, in]`` product a step."""
    if steps <= 0:
        return codebooks, scales
    books, size, g = codebooks.shape
    books_ = codebooks.clone().requires_grad_(True)
    scales_ = scales.clone().requires_grad_(True)
    flat_codes = codes.reshape(-1, books)
    optimizer = torch.optim.Adam([books_, scales_], lr=lr)
    norm = ((target @ gram) * target).sum().clamp_min(1e-30)
    for _ in range(steps):
        words = _words(books_.detach(), codes)  # [out, groups, g]
        delta = target - (words * scales_.detach()[:, None, None]).reshape(target.shape)
        grad = (-2 / norm) * (delta @ gram).reshape(words.shape)  # dL/dW^
        scales_.grad = (grad * words).sum((1, 2))
        grad_words = (grad * scales_.detach()[:, None, None]).reshape(-1, g)
        books_.grad = torch.stack([torch.zeros(size, g, dtype=grad.dtype, device=grad.device)
                                   .index_add_(0, flat_codes[:, m], grad_words) for m in range(books)])
        optimizer.step()
    return books_.detach(), scales_.detach()


def fit_additive_quantization(weight: Tensor, gram: Tensor | None, spec: AQSpec, beam_size: int = 1,
                              tolerance: float = 0.01, max_rounds: int = 20, adam_steps: int = 20, lr: float = 1e-3,
                              kmeans_iterations: int = 15, seed: int = 0) -> AQFit:
    """Fit AQLM codes, codebooks and scales to ``weight [out, in]`` for the input Gram ``gram [in, in]``
    (``X X^T``; None: the plain weight error, ``G = I``).

    Rounds of beam search then ``adam_steps`` Adam steps run until the relative
    error improves by less than ``tolerance`` (or ``max_rounds``); the best
    state seen is returned. Works in float32 on the weight's device, then rounds the codebooks to their 16-bit
    storage dtype and the scales to the weight's dtype; ``relative_error`` is that of the rounded tensors.
    """
    start = time.perf_counter()
    out_features, in_features = weight.shape
    check_shape(spec, out_features, in_features, "weight")
    device = weight.device
    target_full = weight.detach().to(torch.float32)
    if gram is None:
        gram = torch.eye(in_features, dtype=torch.float32, device=device)
    g64 = gram.detach().to(device=device, dtype=torch.float64)
    g64 = g64 / g64.diagonal().mean().clamp_min(1e-300)  # the objective is invariant to the Gram's scale
    g64 = g64 + 1e-6 * torch.eye(in_features, dtype=torch.float64, device=device)  # positive definite
    g32 = g64.to(torch.float32)
    generator = torch.Generator().manual_seed(seed)

    scales = target_full.pow(2).mean(1).sqrt().clamp_min(1e-12)  # per-row RMS: scaled rows have unit RMS
    groups = in_features // spec.group_size
    scaled = target_full / scales[:, None]
    diag = g32.diagonal().reshape(groups, spec.group_size)
    weights = (scales[:, None, None] ** 2 * diag[None]).reshape(-1, spec.group_size)
    codebooks, flat = _kmeans_init(scaled.reshape(-1, spec.group_size), weights, spec, kmeans_iterations, generator)
    codes = flat.reshape(out_features, groups, spec.codebooks)

    def error(books: Tensor, codes_: Tensor, scales_: Tensor) -> float:
        return relative_error(target_full - _reconstruct(books, codes_, scales_), target_full, g64)

    errors = [error(codebooks, codes, scales)]
    best = (errors[0], codebooks, codes, scales)
    for round_ in range(max_rounds):
        codes = _beam_search(target_full / scales[:, None], g32, codebooks, codes, beam_size)
        codebooks, scales = _adam(target_full, g32, codebooks, scales, codes, adam_steps, lr)
        errors.append(error(codebooks, codes, scales))
        if errors[-1] < best[0]:
            best = (errors[-1], codebooks, codes, scales)
        log.debug("aq round %d: relative error %.5g", round_, errors[-1])
        if errors[-2] - errors[-1] < tolerance * errors[-2]:
            break
    _, codebooks, codes, scales = best
    codebooks, scales = codebooks.to(codebook_dtype(weight.dtype)), scales.to(weight.dtype)
    return AQFit(storage_codes(codes, spec), codebooks, scales, errors,
                 error(codebooks.to(torch.float64), codes, scales.to(torch.float64)), time.perf_counter() - start)
