"""Unit tests of passes/decomposition.py: svd / asvd / whiten factorisations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lrcompile.errors import CalibrationError, LowRankConfigError
from lrcompile.passes.decomposition import LinearDecomposition, decompose, regularized_cholesky
from lrcompile.types import ActivationStats

METHODS = ("svd", "asvd", "whiten")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _stats(x: torch.Tensor) -> ActivationStats:
    stats = ActivationStats.empty(x.shape[-1])
    stats.update(x)
    return stats


def _sample(out_f: int, in_f: int, rows: int, seed: int, dtype=torch.float32):
    g = _gen(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=dtype)
    x = torch.randn(rows, in_f, generator=g, dtype=dtype) * (0.5 + torch.rand(in_f, generator=g, dtype=dtype))
    return w, x


# --------------------------------------------------------------------------- full rank


@pytest.mark.parametrize("rank", [0, -1, 25, 2.0, True])
def test_factors_refuse_a_rank_outside_the_weight(rank):
    w, x = _sample(24, 40, 128, seed=1)
    with pytest.raises(ValueError, match=rf"rank={rank!r}: expected an integer in \[1, 24\]"):
        decompose(w, "svd", None, alpha=0.5, layer="fc").factors(rank, torch.float32)


@pytest.mark.parametrize("method", METHODS)
def test_full_rank_reconstructs_weight_float32(method):
    w, x = _sample(24, 40, 128, seed=1)
    d = decompose(w, method, _stats(x), alpha=0.5, layer="fc")
    full = min(w.shape)
    assert d.full_rank == full
    down, up = d.factors(full, torch.float32)
    assert down.shape == (full, 40) and up.shape == (24, full)
    assert down.dtype == up.dtype == torch.float32
    scale = w.abs().max().item()
    torch.testing.assert_close(up @ down, w, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(d.reconstruct(full, torch.float32), w, rtol=0, atol=1e-5 * scale)
    assert d.truncation_loss(full) == 0.0


@pytest.mark.parametrize("method", METHODS)
def test_full_rank_is_exact_in_float64(method):
    w, x = _sample(16, 12, 64, seed=2, dtype=torch.float64)
    d = decompose(w, method, _stats(x), alpha=0.5)
    assert d.u.dtype == d.s.dtype == d.vt.dtype == torch.float64
    torch.testing.assert_close(d.reconstruct(12, torch.float64), w, rtol=0, atol=1e-10)
    # singular values come back descending and non-negative
    assert torch.all(d.s[:-1] >= d.s[1:]) and torch.all(d.s >= 0)


@pytest.mark.parametrize("method", METHODS)
def test_truncated_rank_differs_from_weight(method):
    w, x = _sample(24, 40, 128, seed=3)
    d = decompose(w, method, _stats(x))
    err = (d.reconstruct(4, torch.float32) - w).norm() / w.norm()
    assert err > 0.1  # random weights are not low rank: truncation must drop something
    assert 0.1 < d.truncation_loss(4) < 1.0


# --------------------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None)
@given(
    out_f=st.integers(1, 48),
    in_f=st.integers(1, 48),
    method=st.sampled_from(METHODS),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_factor_shapes_and_truncation_loss_properties(out_f, in_f, method, seed, data):
    w, x = _sample(out_f, in_f, in_f + 8, seed)
    d = decompose(w, method, _stats(x), alpha=0.5)
    full = min(out_f, in_f)
    assert d.full_rank == full
    rank = data.draw(st.integers(1, full), label="rank")
    down, up = d.factors(rank, torch.float32)
    assert tuple(down.shape) == (rank, in_f)
    assert tuple(up.shape) == (out_f, rank)
    assert down.is_contiguous() and up.is_contiguous()
    losses = [d.truncation_loss(k) for k in range(0, full + 1)]
    assert losses[0] == pytest.approx(1.0, abs=1e-12)
    assert losses[-1] == 0.0
    for k, loss in enumerate(losses):
        assert -1e-15 <= loss <= 1.0 + 1e-12, (k, loss)
    for k in range(full):
        assert losses[k + 1] <= losses[k] + 1e-12, (k, losses)


@settings(max_examples=25, deadline=None)
@given(out_f=st.integers(1, 48), in_f=st.integers(1, 48), seed=st.integers(0, 2**16), data=st.data())
def test_whiten_truncation_loss_is_output_error(out_f, in_f, seed, data):
    """SVD-LLM Theorem 3.2: with whitening, the dropped energy is the output error on the calibration rows."""
    w, x = _sample(out_f, in_f, in_f + 16, seed, dtype=torch.float64)
    d = decompose(w, "whiten", _stats(x))
    rank = data.draw(st.integers(0, min(out_f, in_f)), label="rank")
    w_k = d.reconstruct(rank, torch.float64)
    direct = ((w - w_k) @ x.T).square().sum() / (w @ x.T).square().sum()
    assert d.truncation_loss(rank) == pytest.approx(float(direct), abs=1e-8)


def test_whiten_is_optimal_among_methods_on_its_calibration_rows():
    w, x = _sample(32, 48, 256, seed=5, dtype=torch.float64)
    stats = _stats(x)
    errors = {}
    for method in METHODS:
        w_k = decompose(w, method, stats).reconstruct(8, torch.float64)
        errors[method] = float(((w - w_k) @ x.T).norm())
    assert errors["whiten"] <= errors["asvd"] + 1e-9
    assert errors["whiten"] <= errors["svd"] + 1e-9


@settings(max_examples=25, deadline=None)
@given(out_f=st.integers(1, 32), in_f=st.integers(1, 32), seed=st.integers(0, 2**16), data=st.data())
def test_output_metric_truncates_the_error_the_metric_weighs(out_f, in_f, seed, data):
    """With ``output_metric`` G, ``whiten`` is exact at full rank and its dropped energy is the G-weighted output
    error ``tr(dW C dW^T G)``, which no rank-k factor of plain whitening beats (Eckart-Young in both metrics)."""
    w, x = _sample(out_f, in_f, in_f + 16, seed, dtype=torch.float64)
    a = torch.randn(out_f, out_f, generator=_gen(seed + 1), dtype=torch.float64)
    metric = a @ a.T + 0.1 * torch.eye(out_f, dtype=torch.float64)
    weighted = decompose(w, "whiten", _stats(x), output_metric=metric)
    assert torch.allclose(weighted.reconstruct(weighted.full_rank, torch.float64), w, atol=1e-8)
    rank = data.draw(st.integers(0, min(out_f, in_f)), label="rank")

    def error(w_k: torch.Tensor) -> float:
        delta = (w - w_k) @ x.T
        return float((delta * (metric @ delta)).sum())

    total = float(((w @ x.T) * (metric @ w @ x.T)).sum())
    assert weighted.truncation_loss(rank) == pytest.approx(error(weighted.reconstruct(rank, torch.float64)) / total,
                                                           abs=1e-8)
    plain = decompose(w, "whiten", _stats(x)).reconstruct(rank, torch.float64)
    assert error(weighted.reconstruct(rank, torch.float64)) <= error(plain) * (1 + 1e-9) + 1e-9


def test_output_metric_is_for_whiten_only():
    w, x = _sample(4, 6, 32, seed=1)
    with pytest.raises(ValueError, match="output metric is for method 'whiten'"):
        decompose(w, "asvd", _stats(x), output_metric=torch.eye(4))


def test_asvd_beats_svd_with_activation_outliers():
    g = _gen(7)
    out_f, in_f, rank = 48, 64, 8
    w = torch.randn(out_f, in_f, generator=g)
    x = torch.randn(512, in_f, generator=g)
    outliers = torch.tensor([3, 17, 42])
    x[:, outliers] *= 50.0
    stats = _stats(x)
    w64, x64 = w.double(), x.double()
    err = {}
    for method in ("svd", "asvd"):
        w_k = decompose(w, method, stats, alpha=0.5).reconstruct(rank, torch.float64)
        err[method] = float(((w64 - w_k) @ x64.T).norm())
    assert err["asvd"] < 0.7 * err["svd"], err


def test_asvd_alpha_zero_is_plain_svd():
    w, x = _sample(20, 30, 64, seed=8)
    a = decompose(w, "asvd", _stats(x), alpha=0.0)
    s = decompose(w, "svd")
    torch.testing.assert_close(a.s, s.s)
    torch.testing.assert_close(a.reconstruct(5, torch.float64), s.reconstruct(5, torch.float64))


def test_asvd_dead_channel_does_not_blow_up():
    w, x = _sample(16, 24, 64, seed=9)
    x[:, 5] = 0.0  # a channel that never fires: mean|x| = 0
    d = decompose(w, "asvd", _stats(x))
    assert torch.isfinite(d.vt).all() and torch.isfinite(d.s).all()
    torch.testing.assert_close(d.reconstruct(16, torch.float32), w, rtol=0, atol=1e-4)


# --------------------------------------------------------------------------- Cholesky


def test_regularized_cholesky_positive_definite_is_exact():
    _, x = _sample(1, 10, 50, seed=10, dtype=torch.float64)
    gram = x.T @ x
    chol = regularized_cholesky(gram, "fc")
    assert torch.equal(chol, torch.tril(chol))
    torch.testing.assert_close(chol @ chol.T, gram, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("kind", ["few_rows", "duplicate_column", "dead_channel", "zero"])
def test_regularized_cholesky_singular_gram(kind):
    g = _gen(11)
    in_f = 16
    if kind == "few_rows":
        x = torch.randn(4, in_f, generator=g, dtype=torch.float64)  # rank 4 < 16
    elif kind == "duplicate_column":
        x = torch.randn(64, in_f, generator=g, dtype=torch.float64)
        x[:, 3] = x[:, 7]
    elif kind == "dead_channel":
        x = torch.randn(64, in_f, generator=g, dtype=torch.float64)
        x[:, 0] = 0.0
    else:
        x = torch.zeros(8, in_f, dtype=torch.float64)
    gram = x.T @ x
    if kind != "duplicate_column":  # (that one may pass undamped on round-off alone)
        assert torch.linalg.cholesky_ex(gram).info != 0  # plain Cholesky fails: damping is needed
    chol = regularized_cholesky(gram, "fc")
    assert torch.isfinite(chol).all()
    assert torch.equal(chol, torch.tril(chol))
    assert (chol.diagonal() > 0).all()
    scale = float(gram.diagonal().mean().clamp_min(1e-12))
    # regularised by at most 1e-2 * mean(diag)
    assert (chol @ chol.T - gram).abs().max() <= 1.01e-2 * scale
    # and whitening still decomposes exactly at full rank
    w = torch.randn(8, in_f, generator=g, dtype=torch.float64)
    stats = _stats(x)
    d = decompose(w, "whiten", stats, layer="fc")
    torch.testing.assert_close(d.reconstruct(8, torch.float64), w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_regularized_cholesky_hopeless_raises_naming_layer(bad):
    gram = torch.eye(6, dtype=torch.float64)
    gram[2, 2] = bad
    with pytest.raises(CalibrationError, match="model.layers.3.mlp.up_proj"):
        regularized_cholesky(gram, "model.layers.3.mlp.up_proj")


def test_whiten_with_nan_stats_raises_calibration_error():
    w, x = _sample(8, 6, 32, seed=12)
    x[0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="'blk.q'"):
        decompose(w, "whiten", _stats(x), layer="blk.q")


@pytest.mark.parametrize("method", ["asvd", "whiten"])
def test_methods_needing_stats_raise_without_them(method):
    with pytest.raises(CalibrationError, match=f"layer 'fc'.*{method}"):
        decompose(torch.randn(4, 4), method, None, layer="fc")


@pytest.mark.parametrize("with_stats", [True, False])
def test_unknown_method_raises_naming_it_and_the_choices(with_stats):
    stats = _stats(torch.randn(8, 4)) if with_stats else None  # without: not "needs activation statistics"
    with pytest.raises(LowRankConfigError, match="layer 'fc': unknown factoring method 'pca'; expected one of 'svd'"):
        decompose(torch.randn(4, 4), "pca", stats, layer="fc")


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_low_precision_weight_factors_keep_dtype(method, dtype):
    w32, x32 = _sample(24, 32, 96, seed=13)
    w, x = w32.to(dtype), x32.to(dtype)
    d = decompose(w, method, _stats(x))
    assert d.u.dtype == d.s.dtype == d.vt.dtype == torch.float64  # computation in float64
    down, up = d.factors(24, dtype)
    assert down.dtype == up.dtype == dtype
    assert d.reconstruct(24, dtype).dtype == dtype
    # decomposition of the low-precision weight is exact in float64 ...
    torch.testing.assert_close(d.reconstruct(24, torch.float64), w.double(), rtol=0, atol=1e-9)
    # ... and the rounded factors reproduce it to the dtype's precision
    eps = torch.finfo(dtype).eps
    err = (up.double() @ down.double() - w.double()).abs().max()
    assert err < 50 * eps * w.double().abs().max()


def test_weight_is_not_modified():
    w, x = _sample(10, 12, 40, seed=14)
    before = w.clone()
    for method in METHODS:
        decompose(w, method, _stats(x))
    assert torch.equal(w, before)


def test_linear_decomposition_factors_fold_sqrt_singular_values():
    u = torch.eye(3, dtype=torch.float64)
    s = torch.tensor([9.0, 4.0, 1.0], dtype=torch.float64)
    vt = torch.eye(3, dtype=torch.float64)
    d = LinearDecomposition(u, s, vt)
    down, up = d.factors(2, torch.float64)
    torch.testing.assert_close(down, torch.tensor([[3.0, 0, 0], [0, 2.0, 0]], dtype=torch.float64))
    torch.testing.assert_close(up, torch.tensor([[3.0, 0], [0, 2.0], [0, 0]], dtype=torch.float64))
    assert d.truncation_loss(1) == pytest.approx((16 + 1) / (81 + 16 + 1))
    assert d.truncation_loss(2) == pytest.approx(1 / 98)
