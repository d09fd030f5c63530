"""Unit tests of passes/rank_allocation.py on hand-made LinearMeta objects."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lrcompile.errors import LowRankConfigError
from lrcompile.passes.rank_allocation import (
    DENSE_REASON,
    FULL_BUDGET_REASON,
    allocate_by_sensitivity,
    allocate_closed_form,
    allocate_uniform,
    build_plan,
    monotone_sensitivity,
    rank_for_ratio,
)
from lrcompile.types import LinearMeta, WeightLayout

SENS_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _meta(name: str, out_f: int, in_f: int, sensitivity=None) -> LinearMeta:
    meta = LinearMeta(name, WeightLayout.LINEAR, out_f, in_f, False, torch.float32)
    if sensitivity is not None:
        meta.sensitivity = dict(sensitivity)
    return meta


def _total(plans) -> int:
    return sum(p.params_after for p in plans)


def _check_ranks(plans, metas, multiple):
    assert [p.name for p in plans] == [m.name for m in metas]
    for plan, meta in zip(plans, metas):
        assert (plan.out_features, plan.in_features) == (meta.out_features, meta.in_features)
        if plan.rank is None:
            assert plan.reason == DENSE_REASON
            assert plan.params_after == meta.dense_params
        else:
            assert plan.rank % multiple == 0 and 0 < plan.rank <= meta.break_even_rank
            assert plan.params_after == plan.rank * (meta.out_features + meta.in_features) < meta.dense_params


# Shapes for which every ratio >= 0.3 is reachable at one rank multiple:
# multiple * (m + n) <= 0.3 * m * n holds for m, n >= 64 with multiple 8, and m, n >= 16 with multiple 1.
def _feasible_layers(multiple: int):
    low = 64 if multiple == 8 else 16
    dims = st.integers(low, 4 * low)
    return st.lists(st.tuples(dims, dims), min_size=1, max_size=5)


layer_sets = st.sampled_from([1, 8]).flatmap(lambda m: st.tuples(st.just(m), _feasible_layers(m)))
ratios = st.floats(0.3, 0.95)


# --------------------------------------------------------------------------- rank_for_ratio


def test_rank_for_ratio_full_ratio_is_dense():
    meta = _meta("fc", 256, 512)
    assert rank_for_ratio(meta, 1.0, 8) is None
    assert rank_for_ratio(meta, 1.5, 8) is None


def test_rank_for_ratio_values():
    meta = _meta("fc", 256, 512)  # 131072 params, 768 per rank
    assert rank_for_ratio(meta, 0.5, 8) == 80  # 85.3 -> 80
    assert rank_for_ratio(meta, 0.5, 1) == 85
    assert rank_for_ratio(meta, 0.01, 8) == 8  # at least one multiple
    assert rank_for_ratio(meta, 0.99, 8) == 168  # 168.9 -> 168 <= break-even 170
    assert meta.break_even_rank == 170


def test_rank_for_ratio_none_where_factoring_does_not_save():
    small = _meta("tiny", 8, 8)  # break-even rank 3 < one multiple of 8
    assert small.break_even_rank == 3
    assert rank_for_ratio(small, 0.3, 8) is None
    assert rank_for_ratio(small, 0.3, 1) == 1
    vector = _meta("vec", 1, 64)  # rank 1 costs 65 > 64 params
    assert vector.break_even_rank == 0
    assert rank_for_ratio(vector, 0.5, 1) is None
    narrow = _meta("narrow", 16, 4096)  # full rank 16 still saves; multiple 32 would exceed it
    assert rank_for_ratio(narrow, 0.5, 32) is None  # full rank 16 > break-even 15


@settings(max_examples=25, deadline=None)
@given(
    out_f=st.integers(1, 600),
    in_f=st.integers(1, 600),
    ratio=st.floats(0.01, 1.0),
    multiple=st.sampled_from([1, 2, 8, 16, 64]),
)
def test_rank_for_ratio_properties(out_f, in_f, ratio, multiple):
    meta = _meta("fc", out_f, in_f)
    rank = rank_for_ratio(meta, ratio, multiple)
    # round down to a multiple, at least one multiple, at most full rank; dense where that does not save
    target = max(multiple, int(ratio * meta.dense_params / (out_f + in_f)) // multiple * multiple)
    target = min(target, min(out_f, in_f))
    if ratio >= 1.0 or target > meta.break_even_rank:
        assert rank is None
    else:
        assert rank == target
        assert rank % multiple == 0
        assert 1 <= rank <= min(out_f, in_f)
        assert meta.factored_params(rank) < meta.dense_params
        if rank > multiple:  # rounded down: never above the ratio's budget
            assert meta.factored_params(rank) <= ratio * meta.dense_params + 1e-9


# --------------------------------------------------------------------------- uniform


def test_allocate_uniform_values():
    metas = [_meta("a", 256, 256), _meta("b", 512, 128), _meta("c", 8, 8)]
    plans = allocate_uniform(metas, 0.5, 8)
    assert [p.rank for p in plans] == [64, 48, None]
    _check_ranks(plans, metas, 8)


@settings(max_examples=25, deadline=None)
@given(layers=layer_sets, ratio=ratios)
def test_allocate_uniform_meets_budget(layers, ratio):
    multiple, shapes = layers
    metas = [_meta(f"l{i}", m, n) for i, (m, n) in enumerate(shapes)]
    plans = allocate_uniform(metas, ratio, multiple)
    _check_ranks(plans, metas, multiple)
    assert _total(plans) <= ratio * sum(m.dense_params for m in metas) + 1e-6
    assert all(p.rank is not None for p in plans)  # every layer can be factored at these shapes


# --------------------------------------------------------------------------- sensitivity


def _curves(draw_values, n_layers):
    return [dict(zip(SENS_RATIOS, vals)) for vals in draw_values[:n_layers]]


@settings(max_examples=25, deadline=None)
@given(
    layers=layer_sets,
    ratio=ratios,
    kls=st.lists(st.lists(st.floats(0.0, 10.0), min_size=len(SENS_RATIOS), max_size=len(SENS_RATIOS)), min_size=5, max_size=5),
)
def test_allocate_by_sensitivity_meets_budget(layers, ratio, kls):
    multiple, shapes = layers
    metas = [_meta(f"l{i}", m, n, dict(zip(SENS_RATIOS, kls[i]))) for i, (m, n) in enumerate(shapes)]
    plans = allocate_by_sensitivity(metas, ratio, multiple)
    _check_ranks(plans, metas, multiple)
    assert _total(plans) <= ratio * sum(m.dense_params for m in metas) + 1e-6
    for plan, meta in zip(plans, metas):
        # a factored layer records its own KL at its chosen candidate ratio; a dense one records none
        if plan.rank is None:
            assert plan.sensitivity is None
        else:
            assert plan.sensitivity in set(meta.sensitivity.values())


def test_allocate_by_sensitivity_gives_more_rank_to_sensitive_layer():
    curve = {r: (1 - r) ** 2 for r in SENS_RATIOS}
    sensitive = _meta("sensitive", 128, 128, {r: 10 * kl for r, kl in curve.items()})
    robust = _meta("robust", 128, 128, curve)
    for order in ([sensitive, robust], [robust, sensitive]):
        plans = {p.name: p for p in allocate_by_sensitivity(order, 0.6, 8)}
        assert plans["sensitive"].rank > plans["robust"].rank
        assert _total(plans.values()) <= 0.6 * 2 * 128 * 128
    plans = {p.name: p for p in allocate_by_sensitivity([sensitive, robust], 0.6, 8)}
    assert (plans["sensitive"].rank, plans["robust"].rank) == (48, 24)
    # rank 48 keeps ratio 0.8 (KL 10 * 0.2^2), rank 24 keeps ratio 0.4 (KL 0.6^2)
    assert plans["sensitive"].sensitivity == pytest.approx(10 * 0.2**2)
    assert plans["robust"].sensitivity == pytest.approx(0.6**2)


def test_allocate_by_sensitivity_insensitive_layers_go_lowest():
    zero = {r: 0.0 for r in SENS_RATIOS}
    metas = [_meta("a", 128, 128, zero), _meta("b", 128, 128, zero)]
    plans = allocate_by_sensitivity(metas, 0.9, 8)
    assert [p.rank for p in plans] == [rank_for_ratio(metas[0], 0.1, 8)] * 2


def test_allocate_by_sensitivity_noisy_curve_is_made_monotone():
    # KL dips at ratio 0.1 (measurement noise): the layer must not jump to ratio 0.1 at a small threshold
    noisy = _meta("noisy", 128, 128, {0.1: 0.01, 0.5: 5.0, 0.9: 0.1})
    other = _meta("other", 128, 128, {0.1: 1.0, 0.5: 0.5, 0.9: 0.2})
    plans = {p.name: p for p in allocate_by_sensitivity([noisy, other], 0.6, 8)}
    assert _total(plans.values()) <= 0.6 * 2 * 128 * 128
    assert plans["noisy"].rank >= plans["other"].rank


# --------------------------------------------------------------------------- closed form


def _spectrum(kind: str, n: int, seed: int = 0) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64)
    if kind == "flat":
        return 1 - i / (2 * n)  # slowly decaying, strictly decreasing
    if kind == "steep":
        return torch.exp(-i / 4)
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g, dtype=torch.float64).sort(descending=True).values


@settings(max_examples=25, deadline=None)
@given(layers=layer_sets, ratio=ratios, seed=st.integers(0, 2**16))
def test_allocate_closed_form_meets_budget(layers, ratio, seed):
    multiple, shapes = layers
    metas = [_meta(f"l{i}", m, n) for i, (m, n) in enumerate(shapes)]
    spectra = {m.name: _spectrum("random", min(m.out_features, m.in_features), seed + i) for i, m in enumerate(metas)}
    plans = allocate_closed_form(metas, spectra, ratio, multiple)
    _check_ranks(plans, metas, multiple)
    assert _total(plans) <= ratio * sum(m.dense_params for m in metas) + 1e-6
    for plan in plans:
        assert 0.0 <= plan.truncation_loss <= 1.0
        if plan.rank is not None:
            s2 = spectra[plan.name].square()
            assert plan.truncation_loss == pytest.approx(float(s2[plan.rank :].sum() / s2.sum()))


@pytest.mark.parametrize("ratio,expected", [(0.3, (24, 8)), (0.5, (56, 8))])
def test_allocate_closed_form_flatter_spectrum_gets_more_rank(ratio, expected):
    n = 128
    metas = [_meta("flat", n, n), _meta("steep", n, n)]
    spectra = {"flat": _spectrum("flat", n), "steep": _spectrum("steep", n)}
    for order in (metas, metas[::-1]):
        plans = {p.name: p for p in allocate_closed_form(order, spectra, ratio, 8)}
        assert (plans["flat"].rank, plans["steep"].rank) == expected
        assert plans["flat"].truncation_loss > plans["steep"].truncation_loss
        assert _total(plans.values()) <= ratio * 2 * n * n


def test_allocate_closed_form_exactly_flat_spectrum_gets_more_rank():
    n = 128
    metas = [_meta("flat", n, n), _meta("steep", n, n)]
    spectra = {"flat": torch.ones(n, dtype=torch.float64), "steep": _spectrum("steep", n)}
    plans = {p.name: p for p in allocate_closed_form(metas, spectra, 0.5, 8)}
    assert plans["flat"].rank is not None and plans["flat"].rank > plans["steep"].rank
    assert _total(plans.values()) >= 0.4 * 2 * n * n  # uses most of the budget


def test_allocate_closed_form_scale_invariant_per_layer():
    # energies are normalised per layer: scaling one layer's spectrum must not change the plan
    n = 96
    metas = [_meta("a", n, n), _meta("b", n, n)]
    spectra = {"a": _spectrum("random", n, 1), "b": _spectrum("random", n, 2)}
    base = [p.rank for p in allocate_closed_form(metas, spectra, 0.5, 8)]
    scaled = [p.rank for p in allocate_closed_form(metas, {"a": spectra["a"] * 1000, "b": spectra["b"]}, 0.5, 8)]
    assert base == scaled


# --------------------------------------------------------------------------- input checks


def _allocate(kind: str, metas, ratio: float, multiple: int = 8):
    if kind == "uniform":
        return allocate_uniform(metas, ratio, multiple)
    if kind == "sensitivity":
        return allocate_by_sensitivity(metas, ratio, multiple)
    return allocate_closed_form(metas, {m.name: _spectrum("random", 64, 0) for m in metas}, ratio, multiple)


@pytest.mark.parametrize("kind", ["uniform", "sensitivity", "closed_form"])
@pytest.mark.parametrize("ratio,multiple,match", [(2.0, 8, "param_ratio=2.0 is outside"), (0.0, 8, "param_ratio=0.0"),
                                                  (-0.5, 8, "param_ratio=-0.5"), (0.5, 0, "rank multiple 0")])
def test_allocation_refuses_a_ratio_or_multiple_out_of_range(kind, ratio, multiple, match):
    metas = [_meta("a", 64, 64, {r: 1 - r for r in SENS_RATIOS})]
    with pytest.raises(LowRankConfigError, match=match):
        _allocate(kind, metas, ratio, multiple)


def test_allocate_by_sensitivity_without_measurements_names_the_layers():
    metas = [_meta("a", 64, 64, {0.5: 0.1}), _meta("b", 64, 64), _meta("c", 64, 64)]
    with pytest.raises(ValueError, match=r"no sensitivity on 2 layer\(s\) \(b, c\): run measure_sensitivity"):
        allocate_by_sensitivity(metas, 0.5, 8)


def test_allocate_closed_form_without_a_spectrum_names_the_layers():
    metas = [_meta("a", 64, 64), _meta("b", 64, 64)]
    with pytest.raises(ValueError, match=r"no singular values for 1 layer\(s\) \(b\)"):
        allocate_closed_form(metas, {"a": _spectrum("random", 64, 0)}, 0.5, 8)


# --------------------------------------------------------------------------- monotone_sensitivity


@settings(max_examples=25, deadline=None)
@given(st.dictionaries(st.floats(0.01, 0.99), st.floats(0.0, 100.0), min_size=1, max_size=12))
def test_monotone_sensitivity_is_non_increasing_envelope(curve):
    mono = monotone_sensitivity(curve)
    assert set(mono) == set(curve)
    ordered = sorted(mono)
    for lo, hi in zip(ordered, ordered[1:]):
        assert mono[lo] >= mono[hi]
    for r in curve:
        assert mono[r] == max(v for q, v in curve.items() if q >= r)


def test_monotone_sensitivity_values():
    assert monotone_sensitivity({0.1: 1.0, 0.5: 3.0, 0.9: 2.0}) == {0.1: 3.0, 0.5: 3.0, 0.9: 2.0}
    assert monotone_sensitivity({0.2: 5.0, 0.8: 1.0}) == {0.2: 5.0, 0.8: 1.0}


@pytest.mark.parametrize(
    ("target", "achieved", "cause"),
    [(0.05, "0.250", "a factored linear keeps at least rank_multiple=8 ranks, and one whose factors would not save "
                     "parameters stays dense"),  # rank 1.6 -> 8, the floor
     (0.7, "0.500", "ranks are rounded down to multiples of rank_multiple=8")],  # rank 22.4 -> 16
)
def test_build_plan_warns_when_the_ratio_is_far_from_the_target(caplog, target, achieved, cause):
    metas = [_meta("a", 64, 64), _meta("b", 64, 64)]
    with caplog.at_level("WARNING", logger="lrcompile.passes.rank_allocation"):
        plan = build_plan("asvd", "uniform", target, allocate_uniform(metas, target, 8), 8)
    assert f"{plan.achieved_ratio:.3f}" == achieved
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"plan (asvd, uniform): achieved parameter ratio {achieved} is far from the target param_ratio {target} "
        f"(2 linears, 2 factored): {cause}; a smaller rank_multiple gets closer"
    ]


def test_build_plan_is_quiet_near_the_target(caplog):
    metas = [_meta("a", 64, 64), _meta("b", 64, 64)]
    with caplog.at_level("WARNING", logger="lrcompile.passes.rank_allocation"):
        build_plan("asvd", "uniform", 0.5, allocate_uniform(metas, 0.5, 8), 8)  # exactly rank 16: ratio 0.5
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


@pytest.mark.parametrize("method,allocation,bad", [("foo", "uniform", "method='foo'"), ("asvd", "greedy", "allocation='greedy'")])
def test_build_plan_names_an_unknown_method_or_allocation(method, allocation, bad):
    with pytest.raises(ValueError, match=f"{bad}: expected one of "):
        build_plan(method, allocation, 0.5, [], 8)


def test_build_plan_totals():
    metas = [_meta("a", 256, 256), _meta("b", 8, 8)]
    plan = build_plan("asvd", "uniform", 0.5, allocate_uniform(metas, 0.5, 8), 8)
    assert plan.dense_params == 256 * 256 + 64
    assert plan.params_after == 64 * 512 + 64
    assert plan.achieved_ratio == pytest.approx((64 * 512 + 64) / (256 * 256 + 64))
    assert plan.layer("b").rank is None
    with pytest.raises(KeyError):
        plan.layer("missing")


@pytest.mark.parametrize("allocation", ["uniform", "closed_form"])
def test_a_plan_at_param_ratio_one_says_no_factoring_was_asked(allocation):
    """At param_ratio 1.0 the weights stay dense because the budget keeps them, not because factoring a layer would
    not pay; below 1.0 a layer too small to gain keeps that reason."""
    metas = [_meta("a", 64, 64), _meta("b", 8, 8)]
    spectra = {m.name: torch.linspace(2.0, 1.0, 8 if m.name == "b" else 64) for m in metas}
    for ratio, reasons in ((1.0, [FULL_BUDGET_REASON] * 2), (0.5, ["", DENSE_REASON])):
        layers = (allocate_uniform(metas, ratio, 8) if allocation == "uniform"
                  else allocate_closed_form(metas, spectra, ratio, 8))
        assert [layer.reason for layer in build_plan("whiten", allocation, ratio, layers, 8).layers] == reasons
