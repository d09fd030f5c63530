"""The pass-level API end to end on fx.GraphModules, without the torch.compile backend."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from lrcompile import LowRankConfig
from lrcompile.errors import CalibrationError
from lrcompile.passes import (
    CalibrationRunner,
    allocate_closed_form,
    allocate_uniform,
    build_plan,
    calibrate,
    collect_stats,
    decompose,
    dense_weight,
    factorize_linears,
    find_linears,
    insert_observers,
    release_dense_weights,
)
from lrcompile.passes.find_linears import placeholder_values
from lrcompile.modules import LowRankLinear
from lrcompile.pipeline import compress_graph, install
from lrcompile.types import CompressedLayer, LayerPlan, LayerStatus, WeightLayout
from tiny_models import tiny_rope_model, token_batches

LINEAR_TARGETS = (F.linear, torch._C._nn.linear, torch.ops.aten.linear.default)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 24)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _model(seed=0):
    torch.manual_seed(seed)
    return MLP().eval()


def _batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 32, generator=g) for _ in range(n)]


def _graph(kind: str, model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    if kind == "symbolic_trace":
        return fx.symbolic_trace(model)
    return torch.export.export(model, (x,)).module()


def _linear_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in LINEAR_TARGETS]


def _calibrated(gm, batches, example_inputs=None):
    """find_linears -> observers -> calibration -> statistics."""
    views = find_linears(gm, example_inputs)
    runner = CalibrationRunner(gm, example_inputs)
    insert_observers(gm, views)
    calibrate(runner, batches, total=len(batches))
    collect_stats(gm, views)
    return views


def _factor(gm, views, ranks, method, example_inputs=None):
    values = placeholder_values(gm, example_inputs)
    layers = {}
    for view in views:
        rank = ranks[view.meta.name]
        if rank is None:
            continue
        meta = view.meta
        d = decompose(dense_weight(gm, view, values), method, meta.stats, 0.5, meta.name)
        down, up = d.factors(rank, meta.weight_dtype)
        plan = LayerPlan(meta.name, meta.out_features, meta.in_features, rank, truncation_loss=d.truncation_loss(rank))
        record = CompressedLayer(plan, method, LayerStatus.FACTORED, meta.weight_dtype)
        bias = gm.get_submodule(str(view.node.target)).bias if view.layout is WeightLayout.MODULE else None
        layers[view] = LowRankLinear.from_factors(down, up, bias, record)
    factorize_linears(gm, layers)
    return layers


@pytest.mark.parametrize("method", ["svd", "asvd", "whiten"])
@pytest.mark.parametrize("kind", ["symbolic_trace", "export"])
def test_full_rank_factors_reproduce_outputs(kind, method):
    model = _model()
    batches = _batches()
    x = torch.randn(4, 32)
    ref = model(x).detach()
    gm = _graph(kind, model, batches[0])
    views = _calibrated(gm, batches)
    assert [v.meta.name for v in views] == ["fc1", "fc2"]
    assert all(v.meta.stats is not None and v.meta.stats.rows == 12 for v in views)
    layers = _factor(gm, views, {"fc1": 32, "fc2": 24}, method)
    assert len(layers) == 2
    assert len(_linear_nodes(gm)) == 4
    with torch.no_grad():
        out = gm(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["symbolic_trace", "export"])
def test_back_to_back_linears_are_all_factored(kind):
    """A linear reading another linear's output: the second is rewritten onto the first one's factors."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 24)).eval()
    batches = _batches()
    x = torch.randn(4, 32)
    ref = model(x).detach()
    gm = _graph(kind, model, batches[0])
    views = _calibrated(gm, batches)
    assert len(_factor(gm, views, {"0": 32, "1": 32, "3": 24}, "whiten")) == 3
    linears = _linear_nodes(gm)
    assert len(linears) == 6 and linears[2].args[0] is linears[1]  # 1's down reads 0's up
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ref, rtol=0, atol=1e-5)


def test_make_fx_graph_linears_are_found_and_factored():
    """AOT-level graphs hold a linear as addmm(b, x, t(W)) (mm without bias): found, factored, W released."""
    from torch.fx.experimental.proxy_tensor import make_fx

    model = _model()
    x = torch.randn(4, 32)
    gm = make_fx(model)(x)
    views = _calibrated(gm, _batches())
    assert [(v.layout, v.meta.out_features, v.meta.in_features, v.meta.compressible) for v in views] == [
        (WeightLayout.LINEAR, 64, 32, True), (WeightLayout.LINEAR, 24, 64, True)]
    _factor(gm, views, {v.meta.name: min(v.meta.out_features, v.meta.in_features) for v in views}, "whiten")
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=1e-5)
    released, _ = release_dense_weights(gm, views, None)
    assert released == (64 * 32 + 24 * 64) * 4  # no transpose left reading them
    assert not any(n.target is torch.ops.aten.t.default for n in gm.graph.nodes)


@pytest.mark.parametrize("kind", ["symbolic_trace", "export"])
def test_reduced_rank_rewrites_graph_and_changes_outputs(kind):
    model = _model()
    batches = _batches()
    x = torch.randn(4, 32)
    ref = model(x).detach()
    gm = _graph(kind, model, batches[0])
    views = _calibrated(gm, batches)
    plans = allocate_uniform([v.meta for v in views], 0.5, 8)
    plan = build_plan("asvd", "uniform", 0.5, plans, 8)
    assert [p.rank for p in plan.layers] == [8, 8]  # 0.5*2048/96 = 10.7 -> 8; 0.5*1536/88 = 8.7 -> 8
    assert plan.params_after <= 0.5 * plan.dense_params
    layers = _factor(gm, views, {p.name: p.rank for p in plan.layers}, "asvd")
    linears = _linear_nodes(gm)
    assert len(linears) == 2 * len(layers) == 4
    # the factored layers hold the thin weights, chained down -> up
    down1, up1, down2, up2 = linears
    assert up1.args[0] is down1 and up2.args[0] is down2
    shapes = [tuple(getattr(gm, n.args[1].target).shape) for n in linears]
    assert shapes == [(8, 32), (64, 8), (8, 64), (24, 8)]
    assert not any(n.op == "call_module" for n in gm.graph.nodes if str(n.target) in ("fc1", "fc2"))
    with torch.no_grad():
        out = gm(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() > 1e-3
    assert (out - ref).norm() / ref.norm() < 1.0  # still an approximation


@pytest.mark.parametrize("kind", ["symbolic_trace", "export"])
def test_passes_run_again_find_the_factors_compressed_already(kind):
    model = _model()
    batches = _batches()
    gm = _graph(kind, model, batches[0])
    _factor(gm, _calibrated(gm, batches), {"fc1": 8, "fc2": 8}, "asvd")
    x = torch.randn(4, 32)
    with torch.no_grad():
        before = gm(x)
    again = find_linears(gm)
    assert [(v.meta.compressible, v.meta.skip_reason) for v in again] == [
        (False, f"a factor of {name} (compressed already)") for name in ("fc1", "fc1", "fc2", "fc2")]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), before, rtol=0, atol=0)
    if kind == "export":  # the new nodes carry the shapes and source lines later passes read
        down, up = _linear_nodes(gm)[:2]
        assert tuple(down.meta["val"].shape) == (4, 8) and tuple(up.meta["val"].shape) == (4, 64)
        assert "fc1" in down.meta["stack_trace"] or "forward" in down.meta["stack_trace"]


@pytest.mark.parametrize("kind", ["symbolic_trace", "export"])
def test_release_dense_weights_drops_them_from_the_graph(kind):
    """The graph stops reading the dense weights and the GraphModule stops holding them (an exported module
    holds its weights itself); the tensors themselves are the model's (left as they are: the backend frees
    them by replacing their modules)."""
    model = _model()
    batches = _batches()
    x = torch.randn(4, 32)
    gm = _graph(kind, model, batches[0])
    views = _calibrated(gm, batches)
    dense = [dense_weight(gm, v, {}) for v in views]
    expected_bytes = sum(w.untyped_storage().nbytes() for w in dense)
    assert expected_bytes == (64 * 32 + 24 * 64) * 4
    layers = _factor(gm, views, {"fc1": 16, "fc2": 8}, "asvd")
    with torch.no_grad():
        before = gm(x)
    released, kept = release_dense_weights(gm, views, None)
    assert released == expected_bytes
    assert all(w.untyped_storage().nbytes() > 0 for w in dense)  # no storage tricks
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert kept == list(range(len(placeholders)))  # no weight placeholders in these graphs
    assert not any(n.op == "get_attr" and n.target in ("fc1.weight", "fc2.weight") for n in gm.graph.nodes)
    assert not any(n.op == "call_module" and n.target in ("fc1", "fc2") for n in gm.graph.nodes)
    held = {id(t) for t in [*gm.state_dict(keep_vars=True).values(), *gm.parameters(), *gm.buffers()]}
    assert not held & {id(w) for w in dense}
    factors = {id(p) for module in layers.values() for p in (module.down, module.up)}
    read = {id(functools.reduce(getattr, str(n.target).split("."), gm)) for n in gm.graph.nodes if n.op == "get_attr"}
    assert factors <= read  # the graph reads the modules' own factor tensors, not copies
    with torch.no_grad():
        torch.testing.assert_close(gm(x), before, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["symbolic_trace", "export"])
def test_release_dense_weights_counts_only_weights_it_released(kind):
    """A dense weight another node still reads (find_linears marks such a layer not compressible; a user
    may factor it all the same) stays in the graph and the module, and is not reported."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 24)

        def forward(self, x):
            return F.linear(x, self.fc.weight, self.fc.bias) + self.fc.weight.sum()

    torch.manual_seed(0)
    batches = _batches()
    gm = _graph(kind, Shared().eval(), batches[0])
    views = find_linears(gm)
    assert views[0].meta.skip_reason == "weight is read by another op too (tied weights, or a module called more than once)"
    _factor(gm, views, {"fc": 8}, "svd")
    released, _ = release_dense_weights(gm, views, None)
    assert released == 0
    assert "fc.weight" in gm.state_dict()
    assert gm(batches[0]).shape == (4, 24)


@pytest.mark.parametrize("with_mask", [False, True])
def test_calibrate_exported_hf_model_with_its_constant_keyword_arguments(with_mask):
    """An HF model exports only with ``use_cache=False``; calibration calls the exported module with the
    constants it was exported with (and derives an ``attention_mask`` it was exported with), so token
    batches calibrate it as they are."""
    model = tiny_rope_model("llama")
    batches = token_batches(2)
    kwargs = {"attention_mask": torch.ones_like(batches[0])} if with_mask else {}
    gm = torch.export.export(model, (batches[0],), kwargs={**kwargs, "use_cache": False}).module()
    views = _calibrated(gm, batches)
    assert len(views) == 2 * 7 + 1  # q, k, v, o, gate, up, down in each block, and lm_head
    assert all(v.meta.stats is not None and v.meta.stats.rows == 2 * 2 * 16 for v in views if v.meta.compressible)


def test_calibrate_exported_module_names_an_input_the_batches_do_not_give():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = MLP()

        def forward(self, x, scale):
            return self.mlp(x) * scale

    torch.manual_seed(0)
    batches = _batches()
    scale = torch.full((24,), 2.0)
    gm = torch.export.export(Scaled().eval(), (batches[0],), kwargs={"scale": scale}).module()
    views = find_linears(gm, None)
    runner = CalibrationRunner(gm)
    insert_observers(gm, views)
    with pytest.raises(CalibrationError, match="does not give the graph input 'scale'"):
        calibrate(runner, batches)
    calibrate(runner, [{"x": b, "scale": scale} for b in batches])
    collect_stats(gm, views)
    assert all(v.meta.stats is not None and v.meta.stats.rows == 12 for v in views)


def test_closed_form_allocation_from_decomposition_spectra():
    model = _model()
    batches = _batches()
    gm = fx.symbolic_trace(model)
    views = _calibrated(gm, batches)
    spectra = {v.meta.name: decompose(dense_weight(gm, v, {}), "whiten", v.meta.stats).s for v in views}
    plans = allocate_closed_form([v.meta for v in views], spectra, 0.6, 8)
    assert sum(p.params_after for p in plans) <= 0.6 * (64 * 32 + 24 * 64)
    assert all(p.rank is not None and p.rank % 8 == 0 for p in plans)


# --------------------------------------------------------------------------- compress_graph


def _config(**kw):
    return LowRankConfig(**{"calibration": _batches(), "compiler": "eager", "rank_multiple": 8, **kw})


def test_compress_graph_full_ratio_leaves_graph_exact():
    model = _model()
    x = torch.randn(4, 32)
    ref = model(x).detach()
    gm = fx.symbolic_trace(model)
    c = compress_graph(gm, [x], _config(param_ratio=1.0, allocation="uniform", method="asvd"))
    assert [layer.rank for layer in c.plan.layers] == [None, None]
    assert all(layer.status is LayerStatus.DENSE for layer in c.layers.values())
    assert not c.replacements and [record.name for _, record in c.records] == ["fc1", "fc2"]  # kept, with records
    with torch.no_grad():
        torch.testing.assert_close(c.gm(x), ref, rtol=0, atol=0)


@pytest.mark.parametrize("method,allocation", [("asvd", "uniform"), ("whiten", "closed_form"), ("svd", "uniform")])
def test_compress_graph_reduced_ratio(method, allocation, tmp_path):
    model = _model()
    x = torch.randn(4, 32)
    ref = model(x).detach()
    gm = fx.symbolic_trace(model)
    c = compress_graph(gm, [x], _config(param_ratio=0.5, allocation=allocation, method=method, dump_dir=str(tmp_path)))
    assert c.gm is gm
    assert c.plan.method == method and c.plan.allocation == allocation
    assert c.plan.params_after <= 0.5 * c.plan.dense_params
    assert all(layer.status is LayerStatus.FACTORED for layer in c.layers.values())
    assert [slot.name for slot, _ in c.replacements] == ["fc1", "fc2"]
    for _, module in c.replacements:
        layer = module.lowrank_record
        assert module.down.shape == (layer.plan.rank, layer.plan.in_features)
        assert module.up.shape == (layer.plan.out_features, layer.plan.rank)
        assert 0.0 < layer.plan.truncation_loss < 1.0
    assert len(_linear_nodes(gm)) == 4
    with torch.no_grad():
        out = c.gm(x)
    install(c.replacements, c.records, [gm])  # the traced module now holds the compressed modules
    assert isinstance(gm.fc1, LowRankLinear) and not hasattr(gm.fc1, "weight")
    with torch.no_grad():
        torch.testing.assert_close(c.gm(x), out, rtol=0, atol=0)
    assert (out - ref).abs().max() > 1e-3
    assert (out - ref).norm() / ref.norm() < 1.0
    dumped = sorted(p.name for p in tmp_path.iterdir())
    assert len(dumped) == 1 and dumped[0].startswith("graph_")
    plan = json.loads((tmp_path / dumped[0] / "plan.json").read_text())
    assert [layer["rank"] for layer in plan["layers"]] == [layer.rank for layer in c.plan.layers]
    assert any(p.name.endswith("_after.py") for p in (tmp_path / dumped[0]).iterdir())


def test_compress_graph_sensitivity_allocation_on_symbolic_trace():
    model = _model()
    x = torch.randn(4, 32)
    gm = fx.symbolic_trace(model)
    c = compress_graph(gm, [x], _config(param_ratio=0.6, allocation="sensitivity", method="asvd", sensitivity_batches=2))
    assert c.plan.params_after <= 0.6 * c.plan.dense_params
    assert all(v.meta.sensitivity for v in c.linears)
