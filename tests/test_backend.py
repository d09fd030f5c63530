"""The lowrank backend through torch.compile on tiny models of every supported family."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from tiny_models import FAMILIES, first_output, tiny_model, token_batches

import lrcompile
import lrcompile.backend
from lrcompile.passes import decompose, dense_weight, factorize_linears, find_linears
from lrcompile.passes.find_linears import module_path, placeholder_values
from lrcompile.modules import LowRankLinear
from lrcompile.pipeline import compress_graph
from lrcompile.types import CompressedLayer, LayerPlan, LayerStatus


def _factored_modules(model):
    return [m for m in model.modules() if isinstance(m, LowRankLinear)]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compile(model, **options):
    """Downstream compiler ``eager`` unless a test asks otherwise: numerics are the same, compiles are fast."""
    options.setdefault("compiler", "eager")
    return torch.compile(model, backend="lowrank", fullgraph=True, options=lrcompile.LowRankConfig(**options))


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_one_reproduces_dense(family):
    model = tiny_model(family)
    ids = token_batches(1, seed=7)[0]
    with torch.no_grad():
        dense = first_output(model(input_ids=ids))
        compiled = _compile(model, calibration=token_batches(2), param_ratio=1.0, compiler="aot_eager")
        out = first_output(compiled(input_ids=ids))
    assert (out - dense).abs().max().item() <= 1e-4
    totals = lrcompile.model_report(model).totals()
    assert totals["param_ratio"] == 1.0 and totals["factored"] == 0


@pytest.mark.parametrize(
    ("family", "method"),
    [(f, m) for f in ("llama", "gpt2") for m in ("svd", "asvd", "whiten")] + [(f, "whiten") for f in ("qwen2", "opt", "falcon", "bert")],
)
def test_full_rank_factoring_is_exact_on_dynamo_graphs(family, method):
    """Every linear of the captured graph factored at full rank: logits within float32 round-off."""
    model = tiny_model(family)
    calib = token_batches(1)[0]

    def full_rank_backend(gm, example_inputs):
        from lrcompile.passes import CalibrationRunner, calibrate, collect_stats, insert_observers

        views = [v for v in find_linears(gm, example_inputs) if v.meta.compressible]
        insert_observers(gm, views)
        calibrate(CalibrationRunner(gm, example_inputs), [calib])
        collect_stats(gm, views)
        values = placeholder_values(gm, example_inputs)
        factors = {}
        for view in views:
            meta = view.meta
            rank = min(meta.out_features, meta.in_features)
            down, up = decompose(dense_weight(gm, view, values), method, meta.stats).factors(rank, meta.weight_dtype)
            plan = LayerPlan(meta.name, meta.out_features, meta.in_features, rank)
            record = CompressedLayer(plan, method, LayerStatus.FACTORED, meta.weight_dtype)
            factors[view] = LowRankLinear.from_factors(down, up, None, record)  # the graph keeps its bias node
        factorize_linears(gm, factors)
        assert factors
        return gm.forward

    ids = token_batches(1, seed=3)[0]
    with torch.no_grad():
        dense = first_output(model(input_ids=ids))
        out = first_output(torch.compile(model, backend=full_rank_backend, fullgraph=True)(input_ids=ids))
    assert (out - dense).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_08_replaces_factored_linears_by_their_factors(family, monkeypatch):
    model = tiny_model(family)
    bytes_before = lrcompile.weight_bytes(model)
    ids = token_batches(1, seed=7)[0]
    sources = []  # the graph inputs the downstream compiler gets, read as it gets them (Dynamo drops them after)
    compile_downstream = lrcompile.backend.compile_downstream
    monkeypatch.setattr(lrcompile.backend, "compile_downstream", lambda compression, config: sources.extend(
        n.meta["grapharg"].source.name for n in compression.gm.graph.nodes if "grapharg" in n.meta
    ) or compile_downstream(compression, config))
    with torch.no_grad():
        out = first_output(_compile(model, calibration=token_batches(2), param_ratio=0.8, allocation="uniform")(input_ids=ids))
    assert torch.isfinite(out).all()
    report = lrcompile.model_report(model)
    totals = report.totals()
    assert totals["factored"] > 0
    assert totals["params_after"] <= 0.8 * totals["params_before"]
    factored = [layer for layer in report.layers if layer.status == "factored"]
    # held by the process: factors in, dense storage of factored layers out
    freed = sum(layer.dense_bytes for layer in factored)
    added = sum(layer.factor_bytes for layer in factored)
    assert lrcompile.weight_bytes(model) == bytes_before - freed + added
    assert totals["weight_bytes_after"] <= 0.8 * totals["weight_bytes_before"]
    read = {module_path(source) for source in sources if source.endswith("._parameters['weight']")}
    assert read  # the layers left dense
    assert not read & {layer.name for layer in factored}  # the downstream compiler gets no dense weight of theirs
    modules = _factored_modules(model)
    assert len(modules) == totals["factored"] and all(m.down.dtype == torch.float32 for m in modules)
    state = model.state_dict()  # the factors, and no dense weight of a factored layer
    for layer in factored:
        assert f"{layer.name}.down" in state and f"{layer.name}.up" in state and f"{layer.name}.weight" not in state


def test_from_pretrained_model_is_compressed_in_place(tmp_path):
    """from_pretrained maps safetensors storage (not resizable): the module swap does not care."""
    tiny_model("bert").save_pretrained(tmp_path)
    model = type(tiny_model("bert")).from_pretrained(tmp_path).eval()
    ids = token_batches(1)[0]
    with torch.no_grad():
        dense = first_output(model(input_ids=ids))
        out = first_output(_compile(model, param_ratio=0.5, method="svd", allocation="uniform")(input_ids=ids))
    assert isinstance(model.encoder.layer[0].intermediate.dense, LowRankLinear)
    assert out.shape == dense.shape and torch.isfinite(out).all()


def test_asvd_collects_no_gram_matrix():
    model = tiny_model("llama")
    seen = []

    def spy(gm, example_inputs):
        result = compress_graph(gm, example_inputs, lrcompile.LowRankConfig(
            calibration=token_batches(1), param_ratio=0.8, method="asvd", allocation="uniform", compiler="eager"))
        seen.extend(v.meta.stats for v in result.linears if v.meta.stats is not None)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=spy)(input_ids=token_batches(1)[0])
    assert seen and all(stats.gram is None and stats.rows > 0 for stats in seen)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_keeps_its_dtype(dtype):
    model = tiny_model("llama").to(dtype)
    with torch.no_grad():
        out = first_output(_compile(model, calibration=token_batches(2), param_ratio=0.8, method="whiten",
                                    allocation="closed_form")(input_ids=token_batches(1)[0]))
    assert out.dtype == dtype and torch.isfinite(out).all()
    factored = _factored_modules(model)
    assert factored and all(m.down.dtype == dtype and m.up.dtype == dtype for m in factored)


@pytest.mark.parametrize("allocation", ["uniform", "sensitivity", "closed_form"])
@pytest.mark.parametrize("method", ["svd", "asvd", "whiten"])
def test_methods_and_allocations_meet_budget(method, allocation):
    model = tiny_model("llama")
    with torch.no_grad():
        _compile(model, calibration=token_batches(2), param_ratio=0.7, method=method, allocation=allocation,
                 sensitivity_batches=1)(input_ids=token_batches(1, seed=9)[0])
    report = lrcompile.model_report(model)
    assert report.param_ratio <= 0.7
    assert all(layer.method == method for layer in report.layers if layer.status == "factored")
    if allocation == "sensitivity":
        assert all(layer.sensitivity is not None for layer in report.layers if layer.status == "factored")


def test_graph_breaks_compress_every_graph():
    class TwoParts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU())
            self.second = torch.nn.Linear(64, 64)

        def forward(self, x):
            h = self.first(x)
            torch._dynamo.graph_break()
            return self.second(h)

    torch.manual_seed(0)
    model = TwoParts().eval()
    x = torch.randn(4, 64)
    with torch.no_grad():
        ref = model(x)
        compiled = torch.compile(model, backend="lowrank", options=lrcompile.LowRankConfig(
            calibration=[torch.randn(4, 64)], param_ratio=1.0, compiler="eager"))
        out = compiled(x)
    assert torch.allclose(out, ref, atol=1e-5)
    names = {layer.name for layer in lrcompile.model_report(model).layers}
    assert names == {"first.0", "second"}


def test_recompile_reuses_recorded_factors_without_recalibrating():
    model = tiny_model("llama")
    compiled = _compile(model, calibration=token_batches(2), param_ratio=0.6, allocation="uniform", method="asvd")
    with torch.no_grad():
        compiled(input_ids=token_batches(1, seq=16)[0])
        ranks = {layer.name: layer.rank for layer in lrcompile.model_report(model).layers}
        # a new static shape recompiles; the model holds the factored modules, read back without calibration
        out = first_output(compiled(input_ids=token_batches(1, seq=12, seed=5)[0]))
    assert out.shape[:2] == (2, 12) and torch.isfinite(out).all()
    assert {layer.name: layer.rank for layer in lrcompile.model_report(model).layers} == ranks


def test_dynamic_shapes_calibrate_on_varied_lengths():
    model = tiny_model("qwen2")
    calib = [token_batches(1, seq=s, seed=s)[0] for s in (8, 12, 20)]
    compiled = torch.compile(model, backend="lowrank", dynamic=True, options=lrcompile.LowRankConfig(
        calibration=calib, param_ratio=0.8, compiler="eager", sensitivity_batches=2))
    with torch.no_grad():
        for seq in (10, 17):
            out = first_output(compiled(input_ids=token_batches(1, seq=seq)[0]))
            assert out.shape[1] == seq and torch.isfinite(out).all()
    assert lrcompile.model_report(model).param_ratio <= 0.8


def test_dict_calibration_with_attention_mask():
    model = tiny_model("bert")
    ids = token_batches(3)
    calib = [{"input_ids": t, "attention_mask": torch.ones_like(t)} for t in ids[:2]]
    with torch.no_grad():
        out = _compile(model, calibration=calib, param_ratio=0.8)(input_ids=ids[2], attention_mask=torch.ones_like(ids[2]))
    assert torch.isfinite(first_output(out)).all()


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_dict_calibration_binds_by_name_when_the_model_is_called_positionally(family):
    """``compiled(ids, mask)`` captures ``args[i]``; the forward's signature names them, so dict batches bind and
    the model compresses as it does when called by keyword."""
    ids = token_batches(3)
    calib = [{"input_ids": t, "attention_mask": torch.ones_like(t)} for t in ids[:2]]
    outputs = []
    for positional in (True, False):
        torch._dynamo.reset()
        compiled = _compile(tiny_model(family), calibration=calib, param_ratio=0.6)
        with torch.no_grad():
            mask = torch.ones_like(ids[2])
            out = compiled(ids[2], mask) if positional else compiled(input_ids=ids[2], attention_mask=mask)
        outputs.append(first_output(out))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-6)


def test_dump_dir_writes_graphs_plan_and_report(tmp_path, monkeypatch):
    monkeypatch.setenv("LRCOMPILE_DUMP", str(tmp_path))
    model = tiny_model("gpt2")
    with torch.no_grad():
        _compile(model, calibration=token_batches(2), param_ratio=0.8, allocation="closed_form", method="whiten")(
            input_ids=token_batches(1)[0])
    graph_dir = next(tmp_path.glob("graph_*"))
    files = {p.name for p in graph_dir.iterdir()}
    assert {"plan.json", "report.json", "report.md"} <= files
    summary = (graph_dir / "passes.txt").read_text().splitlines()
    # transformers wraps forward: the frame Dynamo compiles is the wrapper's, so the line names what it calls
    assert re.fullmatch(r"# Dynamo's frame '\w+' \(.*\.py:\d+\), which calls GPT2LMHeadModel\.forward", summary[0])
    assert "00 find_linears: changed" in summary[1]
    before = next(graph_dir.glob("*_factorize_linears_before.py")).read_text()
    after = next(graph_dir.glob("*_rewrite_linears_after.py")).read_text()  # factors replace the linears
    assert "addmm" in before and "lowrank_transformer_h_0_mlp_c_fc_down" in after
    planned = next(graph_dir.glob("*_allocate_ranks_after.py")).read_text()  # the plan is shown where it is made
    assert "plan:" not in next(graph_dir.glob("*_allocate_ranks_before.py")).read_text()
    assert re.search(r"# lowrank transformer\.h\.0\.mlp\.c_fc: addmm out=256 in=64 float32 \+bias; compressible; "
                     r"plan: rank \d+, 0\.\d{3} of its parameters\n", planned), planned
    factored = next(graph_dir.glob("*_factorize_linears_after.py")).read_text()  # error feedback keeps no statistics
    assert "c_fc: addmm out=256 in=64 float32 +bias; compressible; factored on 64 tokens of its input with the " \
           "layers before it compressed; plan: rank" in factored, factored
    report = (graph_dir / "report.md").read_text()
    assert "transformer.h.0.mlp.c_fc" in report and "flops_compressed(T)" in report and "truncation loss" in report
    dumped = json.loads((graph_dir / "report.json").read_text())  # the tied lm_head is skipped: listed, not counted
    assert [layer["name"] for layer in dumped["layers"] if layer["status"] == "skipped"] == ["transformer.wte"]
    on_model = lrcompile.model_report(model)  # names the head itself, not the embedding the graph reads it as
    totals = on_model.totals()
    assert (dumped["totals"]["linears"], dumped["totals"]["factored"]) == (totals["linears"], totals["factored"]) == (8, 8)
    assert [(layer.name, layer.reason) for layer in on_model.layers if layer.status == "skipped"] == [
        ("lm_head", "tied to transformer.wte: weight is read by another op too (tied weights, or a module called more "
                    "than once)")]
    assert totals["skipped"] == 1 and "1 more skipped, not in these totals" in on_model.to_markdown()
    assert dumped["totals"]["skipped"] == 1 and "1 more skipped, not in these totals" in report


@pytest.mark.inductor
def test_inductor_compiles_the_rewritten_graph():
    options = dict(calibration=token_batches(2), param_ratio=0.7, method="whiten", allocation="closed_form")
    ids = token_batches(1, seed=11)[0]
    reference_model, inductor_model = tiny_model("llama"), tiny_model("llama")
    with torch.no_grad():
        reference = first_output(_compile(reference_model, compiler="eager", **options)(input_ids=ids))
        torch._dynamo.reset()
        out = first_output(_compile(inductor_model, compiler="inductor", **options)(input_ids=ids))
    assert torch.allclose(out, reference, atol=1e-4)
    assert lrcompile.model_report(inductor_model).param_ratio <= 0.7


def test_back_to_back_linears_are_factored_through_the_backend():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 64)).eval()
    calibration = [torch.randn(64, 64) for _ in range(3)]
    x = torch.randn(64, 64)
    with torch.no_grad():
        out = _compile(model, calibration=calibration, param_ratio=0.5, allocation="uniform")(x)
        torch.testing.assert_close(out, model(x))  # the model now holds the factors the graph runs
    assert lrcompile.model_report(model).totals()["factored"] == 3


class _Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale, self.a, self.b = 0.5, torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)

    def forward(self, x):
        return self.b(torch.relu(self.a(x * self.scale)))  # dynamic=True lifts the float to a new tensor per call


def test_a_float_attribute_lifted_by_dynamic_shapes_does_not_fail_the_instance_check():
    torch.manual_seed(0)
    model = _Scaled().eval()
    options = lrcompile.LowRankConfig(calibration=[torch.randn(32, 64)] * 2, param_ratio=0.5, compiler="eager")
    compiled = torch.compile(model, backend="lowrank", dynamic=True, options=options)
    with torch.no_grad():
        for rows in (8, 9, 10):
            x = torch.randn(rows, 64)
            torch.testing.assert_close(compiled(x), model(x))
    assert isinstance(model.a, lrcompile.modules.LowRankLinear)


def test_factors_are_frozen_and_train_when_unfrozen():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    compiled = _compile(model, calibration=[torch.randn(64, 64)], param_ratio=0.5, allocation="uniform",
                        compiler="aot_eager")
    with torch.no_grad():
        compiled(torch.randn(64, 64))
    assert not any(p.requires_grad for m in (model[0], model[2]) for p in (m.down, m.up))  # frozen, as the README says
    model.requires_grad_(True)
    compiled(torch.randn(64, 64)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (model[0].down, model[0].up, model[2].up))


class _Broken(torch.nn.Module):
    """Linears on both sides of a graph break; the later ones read an intermediate value, not the model's input."""

    def __init__(self, nested: bool):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.lm_head = (torch.nn.Linear(64, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 100))
        self.nested = nested

    def forward(self, x):
        h = torch.relu(self.a(x)) * 3
        if self.nested:  # the break inside a submodule: Dynamo compiles its forward as a frame of its own
            return self.inner(h)
        torch._dynamo.graph_break()
        return self.lm_head(torch.relu(self.b(h)))


class _Tail(torch.nn.Module):
    def __init__(self, outer):
        super().__init__()
        self.b, self.lm_head = outer.b, outer.lm_head

    def forward(self, h):
        h = torch.relu(self.b(h))
        torch._dynamo.graph_break()
        return self.lm_head(h)


@pytest.mark.parametrize("method,allocation", [("whiten", "closed_form"), ("svd", "uniform")])  # data-free too
@pytest.mark.parametrize("nested", [False, True])
def test_layers_to_compress_after_a_graph_break_are_an_error(nested, method, allocation):
    model = _Broken(nested).eval()
    if nested:
        model.inner = _Tail(model)
    options = lrcompile.LowRankConfig(calibration=[torch.randn(16, 64) for _ in range(4)], param_ratio=0.6,
                                      method=method, allocation=allocation, compiler="eager")
    with pytest.raises(Exception, match=r"a graph break splits the compiled model: Dynamo's frame '\w+' \(.*\.py:\d+\) "
                       r"starts after it and holds 1 linear\(s\) to compress \(b, named within that frame\)") as info:
        with torch.no_grad():
            torch.compile(model, backend="lowrank", options=options)(torch.randn(16, 64))
    assert isinstance(getattr(info.value, "inner_exception", info.value), lrcompile.GraphBreakError)
    assert type(model.b) is torch.nn.Linear


def test_only_the_output_head_after_a_graph_break_passes():
    model = _Broken(nested=False).eval()
    model.b = torch.nn.Identity()  # the head alone after the break: excluded by default, nothing to compress there
    options = lrcompile.LowRankConfig(calibration=[torch.randn(16, 64) for _ in range(4)], param_ratio=0.6,
                                      compiler="eager")
    x = torch.randn(16, 64)
    with torch.no_grad():
        out = torch.compile(model, backend="lowrank", options=options)(x)
        torch.testing.assert_close(out, model(x))
    assert isinstance(model.a, lrcompile.modules.LowRankLinear) and type(model.lm_head) is torch.nn.Linear


def test_two_instances_of_one_class_get_their_own_factors():
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ids = token_batches(1)[0]
    options = dict(calibration=token_batches(2), param_ratio=0.8, allocation="uniform")
    with torch.no_grad():
        _compile(a, **options)(input_ids=ids)
        out_b = first_output(_compile(b, **options)(input_ids=ids))
    # b was compressed from its own weights: it holds its own factored modules
    assert lrcompile.model_report(b).totals()["factored"] > 0
    assert isinstance(b.model.layers[0].mlp.up_proj, LowRankLinear)
    assert b.model.layers[0].mlp.up_proj.down is not a.model.layers[0].mlp.up_proj.down
    assert torch.isfinite(out_b).all()


def test_one_options_object_shared_by_two_instances_fails_loudly():
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ids = token_batches(1)[0]
    shared = lrcompile.LowRankConfig(calibration=token_batches(2), param_ratio=0.8, allocation="uniform", compiler="eager")
    with torch.no_grad():
        torch.compile(a, backend="lowrank", options=shared)(input_ids=ids)
        with pytest.raises(lrcompile.LowRankError, match="holds the factors of another model instance"):
            torch.compile(b, backend="lowrank", options=shared)(input_ids=ids)


def test_compiled_graph_keeps_no_activation_statistics():
    """Statistics (a float64 X^T X per layer for whitening) must not live on with the compiled graph."""
    from lrcompile.types import META_KEY

    model = tiny_model("llama")
    kept = []
    import lrcompile.backend as backend

    real_downstream = backend.compile_downstream

    def spy(compression, config):
        kept.append(compression.gm)
        return real_downstream(compression, config)

    backend.compile_downstream = spy
    try:
        with torch.no_grad():
            _compile(model, calibration=token_batches(2), param_ratio=0.9, method="whiten", allocation="closed_form")(
                input_ids=token_batches(1)[0])
    finally:
        backend.compile_downstream = real_downstream
    metas = [n.meta[META_KEY] for n in kept[0].graph.nodes if META_KEY in n.meta]
    assert metas and any(m.compressible for m in metas)  # layers left dense are still in the graph
    assert all(m.stats is None for m in metas)


def test_new_options_recompress_while_dense_weights_are_held(caplog):
    """Ratio 1.0 keeps every layer dense; a later compile at 0.5 must compress, not reuse the ratio-1.0 records."""
    model = tiny_model("llama")
    ids = token_batches(1, seed=7)[0]
    with torch.no_grad():
        dense = first_output(model(input_ids=ids))
        _compile(model, calibration=token_batches(2), param_ratio=1.0)(input_ids=ids)
        torch._dynamo.reset()
        with caplog.at_level(logging.WARNING, logger="lrcompile"):
            out = first_output(_compile(model, calibration=token_batches(2), param_ratio=0.5,
                                        allocation="uniform")(input_ids=ids))
    assert (out - dense).abs().max().item() > 1e-3
    assert lrcompile.model_report(model).param_ratio <= 0.5
    assert caplog.text.count("kept dense by an earlier compile with other options are compressed again") == 1


def test_a_skipped_head_is_compressed_when_new_options_include_it():
    """The head's skipped record (excluded by default) names it in the report; it does not decide the layer for a
    later compile that includes it."""
    model = tiny_model("llama")
    ids = token_batches(1, seed=7)[0]
    with torch.no_grad():
        _compile(model, calibration=token_batches(2), param_ratio=1.0)(input_ids=ids)
        assert [layer.status for layer in lrcompile.model_report(model).layers if layer.name == "lm_head"] == ["skipped"]
        torch._dynamo.reset()
        _compile(model, calibration=token_batches(2), param_ratio=0.5, allocation="uniform", exclude=())(input_ids=ids)
    assert isinstance(model.lm_head, lrcompile.LowRankLinear)


def test_new_options_after_release_name_both_configs(caplog):
    """The refusal comes before any word of compressing the layers the first compile kept dense again."""
    model = tiny_model("llama")
    ids = token_batches(1, seed=7)[0]
    with torch.no_grad():
        _compile(model, calibration=token_batches(2), param_ratio=0.8)(input_ids=ids)
        assert "dense" in {layer.status for layer in lrcompile.model_report(model).layers}  # q/k/v here
        torch._dynamo.reset()
        with pytest.raises(torch._dynamo.exc.BackendCompilerFailed,
                           match=r"compressed with param_ratio=0\.8 .* asks for param_ratio=0\.7 .* fresh copy"):
            _compile(model, calibration=token_batches(2), param_ratio=0.7)(input_ids=ids)
    assert "compressed again" not in caplog.text


def test_same_options_after_reset_reuse_the_records(caplog):
    model = tiny_model("llama")
    ids = token_batches(1, seed=7)[0]
    options = dict(calibration=token_batches(2), param_ratio=0.5, allocation="uniform")
    with torch.no_grad():
        first = first_output(_compile(model, **options)(input_ids=ids))
        torch._dynamo.reset()
        with caplog.at_level(logging.INFO, logger="lrcompile"):
            again = first_output(_compile(model, **options)(input_ids=ids))
    assert torch.equal(first, again)
    factored = sum(isinstance(m, lrcompile.LowRankLinear) for m in model.modules())
    assert f"{factored} module(s) of the linears found are compressed already" in caplog.text  # not a factor pair's 2


def test_a_config_asking_for_nothing_runs_the_model_as_compressed():
    """A compile with no calibration and only default options (to run the model, as ``LatentKVCache`` needs) uses an
    in-memory compressed model as it is, like a loaded one; asking for another option without calibration is still
    refused, naming it."""
    model = tiny_model("llama")
    ids = token_batches(1, seed=7)[0]
    with torch.no_grad():
        first = first_output(_compile(model, calibration=token_batches(2), param_ratio=0.5)(input_ids=ids))
        torch._dynamo.reset()
        assert torch.equal(first_output(_compile(model)(input_ids=ids)), first)
        torch._dynamo.reset()
        with pytest.raises(torch._dynamo.exc.BackendCompilerFailed,
                           match=r"compressed with param_ratio=0\.5 .* asks for param_ratio=0\.7"):
            _compile(model, param_ratio=0.7)(input_ids=ids)


def test_model_generate_on_a_lowrank_compiled_forward(caplog):
    """transformers' own generate: the first compiled call has generate's inputs (position_ids, cache, ...) and the
    prompt's static shape; tensor calibration batches of another shape bind to input_ids and are re-cut to fit."""
    from tiny_models import tiny_rope_model

    model = tiny_rope_model("llama")
    model.forward = torch.compile(model.forward, backend="lowrank", options=lrcompile.LowRankConfig(
        calibration=token_batches(3, seq=16), param_ratio=0.5, allocation="uniform", compiler="eager"))
    prompt = token_batches(1, batch=1, seq=6, seed=5)[0]
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="lrcompile"):
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False)
        logits = model(out, use_cache=False).logits
    # 3 batches x 2 rows x 16 tokens: 2 windows of 6 per row, 12 windows of [1, 6]; each row's last 4 tokens dropped
    assert "re-cut into 12 batches of that shape, using 72 of the 96 token positions given" in caplog.text
    assert lrcompile.model_report(model).param_ratio <= 0.5
    assert torch.equal(logits[0, 5:-1].argmax(-1), out[0, 6:])  # cached decode agrees with a full recompute


@pytest.mark.parametrize("rows", [4, 2], ids=["captured shape", "re-cut"])
def test_padded_batches_for_a_graph_without_a_mask_are_refused_at_any_shape(rows):
    """A call without attention_mask captures a graph that cannot see padding: padded calibration batches are refused
    whether they have the call's shape or are re-cut to it (re-cutting must not drop the mask and calibrate on pads)."""
    model = tiny_model("llama")
    ids = token_batches(1, batch=4, seq=32)[0]
    mask = torch.ones_like(ids)
    mask[:2, 16:] = 0
    compiled = _compile(model, calibration=[dict(input_ids=ids, attention_mask=mask)] * 2, param_ratio=0.7)
    with torch.no_grad(), pytest.raises(torch._dynamo.exc.BackendCompilerFailed,
                                        match=r"gives \['attention_mask'\], which the captured graph does not take "
                                              r"\(its attention_mask marks padding"):
        compiled(input_ids=ids[:rows], use_cache=False)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_eager_call_after_compression_runs_the_factors(family):
    """A compressed model is an ordinary model: an eager call (after reset, torch.compiler.disable, Dynamo's
    fallback at the recompile limit) runs the factored modules and agrees with the compiled graph."""
    model = tiny_model(family)
    ids = token_batches(1, seed=7)[0]
    compiled_model = _compile(model, calibration=token_batches(2), param_ratio=0.5, allocation="uniform")
    with torch.no_grad():
        compiled = first_output(compiled_model(input_ids=ids))
        again = first_output(compiled_model(input_ids=ids))  # the recompiled graph over the new modules
        torch._dynamo.reset()
        eager = first_output(model(input_ids=ids))
        disabled = first_output(torch.compiler.disable(model)(input_ids=ids))
    assert (eager - compiled).abs().max().item() <= 1e-4 and torch.equal(eager, disabled)
    assert (again - compiled).abs().max().item() <= 1e-4
    assert _factored_modules(model) and not any(name.endswith(".weight") and "mlp" in name and "c_proj" not in name
                                               and "c_fc" not in name for name in model.state_dict())


def test_recompile_limit_falls_back_to_eager_factors():
    """Past Dynamo's recompile limit the forward runs eagerly: slower, never an error."""
    model = tiny_model("llama")
    compiled = _compile(model, calibration=token_batches(2), param_ratio=0.5, allocation="uniform")
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=2):
        for seq in (16, 9, 10, 11, 12):  # each static shape recompiles; the last ones run eagerly
            ids = token_batches(1, seq=seq, seed=seq)[0]
            torch.testing.assert_close(first_output(compiled(input_ids=ids)), first_output(model(input_ids=ids)),
                                       rtol=0, atol=1e-4)


def test_compiler_mode_and_options_reach_inductor(monkeypatch):
    """``compiler_mode`` / ``compiler_options`` arrive as Inductor's config patches, as torch.compile's own would."""
    import torch._inductor.compile_fx as inductor

    received = []

    def compile_fx(gm, inputs, config_patches=None):
        received.append(config_patches)
        return gm.forward

    monkeypatch.setattr(inductor, "compile_fx", compile_fx)
    model = tiny_model("llama")
    ids = token_batches(1, seed=7)[0]
    with torch.no_grad():
        _compile(model, calibration=token_batches(1), param_ratio=1.0, compiler="inductor",
                 compiler_mode="reduce-overhead", compiler_options={"max_autotune": True})(input_ids=ids)
    assert received == [{"triton.cudagraphs": True, "max_autotune": True}]


class _ParentReadsChildWeight(torch.nn.Module):
    """``fc``'s weight is read by the parent's forward (``F.linear`` or ``x @ W.T``), not by ``fc``'s own."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.fc, self.mid, self.out = torch.nn.Linear(64, 128), torch.nn.Linear(64, 64), torch.nn.Linear(128, 64)

    def forward(self, x):
        h = self.mid(x)
        h = torch.nn.functional.linear(h, self.fc.weight, self.fc.bias) if self.form == "F.linear" else \
            h @ self.fc.weight.T
        return self.out(torch.relu(h))


@pytest.mark.parametrize("form", ["F.linear", "x @ W.T"])
def test_a_weight_read_outside_its_module_stays_dense_and_the_model_keeps_working(form, caplog):
    """Replacing ``fc`` would leave the parent's code reading a weight that is gone: the first call would work and
    every later call (and the eager model) fail. It stays dense, named in a warning and in the report."""
    torch.manual_seed(0)
    model, x = _ParentReadsChildWeight(form).eval(), torch.randn(8, 64)
    compiled = _compile(model, calibration=[torch.randn(8, 64) for _ in range(4)], param_ratio=0.5,
                        allocation="uniform")
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="lrcompile"):
        first, again, eager = compiled(x), compiled(x), model(x)
    assert isinstance(model.fc, torch.nn.Linear) and isinstance(model.mid, LowRankLinear)
    assert torch.allclose(first, again) and torch.allclose(first, eager, atol=1e-5)
    assert "stay dense: its weight is read outside its module's forward (by the model's own forward)" in caplog.text
    [fc] = [layer for layer in lrcompile.model_report(model).layers if layer.name == "fc"]
    assert fc.status == "skipped" and "outside its module's forward" in fc.reason


def test_compiling_an_exported_module_refuses_to_break_its_generated_code():
    """``torch.export(...).module()`` reads ``fc1.weight`` in its generated code: the backend must not swap the
    module (the next call would fail on the missing weight); with nothing else to compress that is an error
    pointing to the pass-level API."""
    torch.manual_seed(0)
    x = torch.randn(2, 10, 16)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)).eval()
    exported = torch.export.export(mlp, (x,)).module()
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed,
                       match=r"generated code of the model, an fx.GraphModule .* pass-level API"):
        _compile(exported, calibration=[torch.randn(2, 10, 16) for _ in range(4)], param_ratio=0.5)(x)
    assert not any(isinstance(m, LowRankLinear) for m in exported.modules())
    assert torch.allclose(exported(x), mlp(x))


def test_an_einsum_read_linear_is_in_the_report_and_warned_once(caplog):
    class Einsum(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = torch.nn.Linear(64, 128), torch.nn.Linear(128, 64)

        def forward(self, x):
            return self.out(torch.einsum("bi,oi->bo", x, self.fc.weight))

    model, x = Einsum().eval(), torch.randn(8, 64)
    compiled = _compile(model, calibration=[torch.randn(8, 64) for _ in range(4)], param_ratio=0.5,
                        allocation="uniform")
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="lrcompile"):
        compiled(x)
        compiled(x)  # recompiles (out was replaced): fc has its record and is not warned again
    assert caplog.text.count("use their weight in an op other than a linear (an einsum, say) and stay dense: fc") == 1
    [fc] = [layer for layer in lrcompile.model_report(model).layers if layer.name == "fc"]
    assert fc.status == "skipped" and "einsum" in fc.reason


def test_a_parameter_of_the_model_itself_in_a_linear_is_named_in_a_warning(caplog):
    class RootWeight(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(128, 64) / 8)
            self.out = torch.nn.Linear(128, 64)

        def forward(self, x):
            return self.out(torch.relu(torch.nn.functional.linear(x, self.w)))

    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="lrcompile"):
        compiled = _compile(RootWeight().eval(), calibration=[torch.randn(8, 64) for _ in range(4)], param_ratio=0.5,
                            allocation="uniform")
        compiled(torch.randn(8, 64))
        compiled(torch.randn(8, 64))  # recompiles (out was replaced): w is not warned again
    assert caplog.text.count("stay dense: its weight is not a parameter of one of the model's submodules") == 1
    assert "w [128 x 64]" in caplog.text


def test_the_report_of_a_model_never_compressed_says_so():
    text = lrcompile.model_report(torch.nn.Sequential(torch.nn.Linear(8, 8))).to_markdown()
    assert text.startswith("Nothing to report: no layer here was compressed or skipped by lrcompile")
