"""Unit tests of passes/find_linears.py on toy graphs (symbolic_trace, export, Dynamo)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from transformers.pytorch_utils import Conv1D

from lrcompile.passes import dense_weight, find_linears, linear_view
from lrcompile.passes.find_linears import placeholder_values, weight_tensor
from lrcompile.types import META_KEY, WeightLayout


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 24)
        self.down = nn.Linear(24, 6, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.lm_head = nn.Linear(6, 10)

    def forward(self, x):
        return self.lm_head(self.block(x))


class FunctionalProj(nn.Module):
    """A layer holding its own parameters and calling F.linear (get_attr weights)."""

    def __init__(self, in_f, out_f, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_f, in_f))
        self.bias = nn.Parameter(torch.randn(out_f)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Module()
        self.attn.q_proj = FunctionalProj(12, 20)
        self.o_proj = FunctionalProj(20, 12, bias=False)

    def forward(self, x):
        return self.o_proj(self.attn.q_proj(x))


class GPT2MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = Conv1D(32, 8)  # nf=out, nx=in: weight [in, out]
        self.c_proj = Conv1D(8, 32)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = GPT2MLP()

    def forward(self, x):
        return self.mlp(x)


def _by_name(views):
    return {v.meta.name: v for v in views}


def _dynamo_capture(model, *args, inspect=None):
    """Capture Dynamo graphs with a backend that records them (and optionally inspects them in the backend)."""
    captured = []

    def be(gm, example_inputs):
        extra = inspect(gm, example_inputs) if inspect is not None else None
        captured.append((gm, example_inputs, extra))
        return gm.forward

    torch._dynamo.reset()
    try:
        torch.compile(model, backend=be, fullgraph=True)(*args)
    finally:
        torch._dynamo.reset()
    assert len(captured) == 1
    return captured[0]


# --------------------------------------------------------------------------- symbolic_trace: call_module


def test_call_module_linears():
    net = Net()
    gm = fx.symbolic_trace(net)
    views = find_linears(gm, exclude=())  # the output head too
    assert [v.meta.name for v in views] == ["block.up", "block.down", "lm_head"]
    found = _by_name(views)
    up, down = found["block.up"], found["block.down"]
    assert up.layout is down.layout is WeightLayout.MODULE
    assert (up.meta.out_features, up.meta.in_features, up.meta.has_bias) == (24, 8, True)
    assert (down.meta.out_features, down.meta.in_features, down.meta.has_bias) == (6, 24, False)
    assert up.weight is None and up.bias is None and up.input.op == "placeholder"
    assert all(v.meta.compressible and v.meta.skip_reason == "" for v in views)
    assert all(v.node.meta[META_KEY] is v.meta for v in views)
    assert up.meta.weight_dtype == torch.float32
    assert weight_tensor(gm, up, {}) is net.block.up.weight
    assert dense_weight(gm, down, {}) is net.block.down.weight


def test_include_exclude_patterns_give_skip_reasons():
    gm = fx.symbolic_trace(Net())
    found = _by_name(find_linears(gm, None, include=("block.*", "lm_head"), exclude=("lm_head", "*.down")))
    assert found["block.up"].meta.compressible
    assert not found["block.down"].meta.compressible
    assert found["block.down"].meta.skip_reason == "excluded by pattern '*.down'"
    assert found["lm_head"].meta.skip_reason == "excluded by pattern 'lm_head' (the output head, by default)"
    defaults = _by_name(find_linears(fx.symbolic_trace(Net())))  # as LowRankConfig: the output head excluded
    assert defaults["block.down"].meta.compressible and not defaults["lm_head"].meta.compressible

    found = _by_name(find_linears(gm, None, include=("block.up",), exclude=()))
    assert found["block.up"].meta.compressible
    assert found["block.down"].meta.skip_reason == "not matched by include patterns"
    assert found["lm_head"].meta.skip_reason == "not matched by include patterns"
    assert not found["lm_head"].meta.compressible


def test_default_exclude_skips_lm_head():
    from lrcompile.config import DEFAULT_EXCLUDE

    found = _by_name(find_linears(fx.symbolic_trace(Net()), None, ("*",), DEFAULT_EXCLUDE))
    assert not found["lm_head"].meta.compressible
    assert found["block.up"].meta.compressible and found["block.down"].meta.compressible


def test_module_called_twice_is_skipped():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(8, 8)
            self.other = nn.Linear(8, 8)

        def forward(self, x):
            return self.other(self.shared(self.shared(x)))

    views = find_linears(fx.symbolic_trace(Twice()))
    assert [v.meta.name for v in views] == ["shared", "shared", "other"]
    assert [v.meta.skip_reason for v in views[:2]] == ["module is called more than once"] * 2
    assert views[2].meta.compressible


def test_non_linear_nodes_are_not_views():
    gm = fx.symbolic_trace(Net())
    relu = next(n for n in gm.graph.nodes if n.target is torch.relu)
    assert linear_view(gm, relu) is None
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert linear_view(gm, placeholder) is None


# --------------------------------------------------------------------------- symbolic_trace: F.linear + get_attr


def test_functional_linear_with_get_attr_weight():
    net = FunctionalNet()
    gm = fx.symbolic_trace(net)
    views = find_linears(gm)
    assert [v.meta.name for v in views] == ["attn.q_proj", "o_proj"]
    q, o = views
    assert q.layout is o.layout is WeightLayout.LINEAR
    assert q.weight.op == "get_attr" and q.weight.target == "attn.q_proj.weight"
    assert (q.meta.out_features, q.meta.in_features, q.meta.has_bias) == (20, 12, True)
    assert (o.meta.out_features, o.meta.in_features, o.meta.has_bias) == (12, 20, False)
    assert q.bias is not None and o.bias is None
    assert weight_tensor(gm, q, {}) is net.attn.q_proj.weight
    assert all(v.meta.compressible for v in views)


def test_tied_weight_used_twice_is_skipped():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = FunctionalProj(8, 8, bias=False)
            self.free = FunctionalProj(8, 8)

        def forward(self, x):
            y = F.linear(x, self.proj.weight)
            return self.free(F.linear(y, self.proj.weight))

    views = find_linears(fx.symbolic_trace(Tied()))
    assert [v.meta.name for v in views] == ["proj", "proj", "free"]
    assert views[0].weight is views[1].weight  # one get_attr node used by both
    assert [v.meta.skip_reason for v in views[:2]] == ["weight is read by another op too (tied weights, or a module called more than once)"] * 2
    assert views[2].meta.compressible


def test_modules_sharing_one_weight_are_skipped():
    class TiedModules(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.free = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.free(self.b(torch.relu(self.a(x))))

    views = find_linears(fx.symbolic_trace(TiedModules()))
    assert [(v.meta.name, v.meta.skip_reason) for v in views[:2]] == [
        (name, "weight is shared with another module (tied weights)") for name in ("a", "b")]
    assert views[2].meta.compressible


def test_a_matmul_with_a_computed_operand_of_several_inputs_is_left_alone():
    class Selected(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8, 8))

        def forward(self, x, pick):
            return x @ torch.where(pick, self.a, self.b)  # where(c, a, b): two node arguments after the first

    assert find_linears(fx.symbolic_trace(Selected())) == []


def test_computed_weight_is_left_alone():
    class Computed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return F.linear(x, self.w * 2)

    assert find_linears(fx.symbolic_trace(Computed())) == []


def test_non_float_weight_is_skipped():
    class IntWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.ones(4, 4, dtype=torch.int64))

        def forward(self, x):
            return F.linear(x, self.w)

    (view,) = find_linears(fx.symbolic_trace(IntWeight()))
    assert not view.meta.compressible
    assert "2-D float matrix" in view.meta.skip_reason and "torch.int64" in view.meta.skip_reason


# --------------------------------------------------------------------------- Conv1D (addmm)


def test_conv1d_addmm_layout():
    net = GPT2Block()
    gm = fx.symbolic_trace(net)
    views = find_linears(gm)
    assert [v.meta.name for v in views] == ["mlp.c_fc", "mlp.c_proj"]
    fc, proj = views
    assert fc.layout is proj.layout is WeightLayout.ADDMM
    assert fc.node.target is torch.addmm
    assert (fc.meta.out_features, fc.meta.in_features, fc.meta.has_bias) == (32, 8, True)
    assert (proj.meta.out_features, proj.meta.in_features) == (8, 32)
    assert weight_tensor(gm, fc, {}).shape == (8, 32)  # as stored: [in, out]
    assert dense_weight(gm, fc, {}).shape == (32, 8)  # linear layout: [out, in]
    assert torch.equal(dense_weight(gm, fc, {}), net.mlp.c_fc.weight.T)
    assert all(v.meta.compressible for v in views)


def test_addmm_with_beta_is_not_recognised_as_plain_linear():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 6))
            self.b = nn.Parameter(torch.randn(6))

        def forward(self, x):
            return torch.addmm(self.b, x, self.w, beta=0.5)

    views = find_linears(fx.symbolic_trace(Scaled()))
    assert len(views) == 1
    assert not views[0].meta.compressible
    assert "beta/alpha" in views[0].meta.skip_reason


# --------------------------------------------------------------------------- torch.export


def test_export_graph_aten_linear():
    net = Net()
    gm = torch.export.export(net, (torch.randn(2, 8),)).module()
    views = find_linears(gm)
    assert [v.meta.name for v in views] == ["block.up", "block.down", "lm_head"]
    assert all(v.layout is WeightLayout.LINEAR and v.node.target is torch.ops.aten.linear.default for v in views)
    assert [(v.meta.out_features, v.meta.in_features, v.meta.has_bias) for v in views] == [
        (24, 8, True),
        (6, 24, False),
        (10, 6, True),
    ]


# --------------------------------------------------------------------------- Dynamo


def test_dynamo_graph_names_and_layouts_inside_backend():
    net = Net()
    x = torch.randn(2, 3, 8)

    def inspect(gm, ex):  # as the real backend does: grapharg sources are available here
        views = find_linears(gm, ex, ("*",), ("lm_head",))
        return [(v.meta.name, v.layout, v.meta.out_features, v.meta.in_features, v.meta.has_bias, v.meta.skip_reason) for v in views], [
            weight_tensor(gm, v, placeholder_values(gm, ex)) for v in views
        ]

    gm, ex, (rows, weights) = _dynamo_capture(net, x, inspect=inspect)
    assert rows == [
        ("block.up", WeightLayout.LINEAR, 24, 8, True, ""),
        ("block.down", WeightLayout.LINEAR, 6, 24, False, ""),
        ("lm_head", WeightLayout.LINEAR, 10, 6, True, "excluded by pattern 'lm_head' (the output head, by default)"),
    ]
    # weights resolve to the model's own parameters through the placeholders
    assert weights[0] is net.block.up.weight
    assert weights[1] is net.block.down.weight
    assert weights[2] is net.lm_head.weight


def test_dynamo_graph_after_capture():
    net = Net()
    gm, ex, _ = _dynamo_capture(net, torch.randn(2, 8))
    views = find_linears(gm, ex)
    assert [v.meta.name for v in views] == ["block.up", "block.down", "lm_head"]
    assert all(v.weight.op == "placeholder" for v in views)
    values = placeholder_values(gm, ex)
    assert dense_weight(gm, views[1], values) is net.block.down.weight


def test_dynamo_tied_embedding_and_repeated_module():
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(16, 8)
            self.mlp = nn.Linear(8, 8)
            self.proj = nn.Linear(8, 8)
            self.head = nn.Linear(8, 16, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            h = self.embed(ids)
            h = self.mlp(self.mlp(h))  # one module called twice: one weight placeholder, two users
            return self.head(self.proj(h))

    net = TiedLM()

    def inspect(gm, ex):
        return [(v.meta.name, v.meta.compressible, v.meta.skip_reason) for v in find_linears(gm, ex)]

    _, _, rows = _dynamo_capture(net, torch.randint(0, 16, (2, 5)), inspect=inspect)
    tied = "weight is read by another op too (tied weights, or a module called more than once)"
    assert rows[:3] == [("mlp", False, tied), ("mlp", False, tied), ("proj", True, "")]
    # the tied head is skipped; Dynamo gives the shared placeholder the embedding's source, so the
    # name may be either owner's path (currently "embed")
    assert rows[3][1:] == (False, tied)
    assert rows[3][0] in ("head", "embed")
    assert len(rows) == 4


def test_dynamo_conv1d_model():
    net = GPT2Block()

    def inspect(gm, ex):
        return [(v.meta.name, v.layout, v.meta.out_features, v.meta.in_features) for v in find_linears(gm, ex)]

    _, _, rows = _dynamo_capture(net, torch.randn(2, 3, 8), inspect=inspect)
    assert rows == [("mlp.c_fc", WeightLayout.ADDMM, 32, 8), ("mlp.c_proj", WeightLayout.ADDMM, 8, 32)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weight_dtype_recorded(dtype):
    views = find_linears(fx.symbolic_trace(Net().to(dtype)))
    assert all(v.meta.weight_dtype == dtype for v in views)


class TransposedMatmulNet(nn.Module):
    """Linear subclasses computing ``x @ W.T`` (Falcon's ``FalconLinear``) in the three spellings of the transpose,
    and one whose weight enters an einsum, which is no recognised linear."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(8, 16), nn.Linear(16, 12), nn.Linear(12, 8), nn.Linear(8, 8)

    def forward(self, x):
        x = x @ self.a.weight.T + self.a.bias
        x = torch.matmul(x, self.b.weight.t())
        x = x @ self.c.weight.transpose(0, 1)
        return torch.einsum("bi,oi->bo", x, self.d.weight)


@pytest.mark.parametrize("capture", ["symbolic_trace", "dynamo"])
def test_x_times_w_transposed_is_a_linear_and_an_unrecognised_use_is_named(capture):
    from lrcompile.passes.find_linears import captured_frame, unrecognised_linears

    torch.manual_seed(0)
    net, x = TransposedMatmulNet().eval(), torch.randn(3, 8)
    found = {}

    def backend(gm, example_inputs):
        views = find_linears(gm, example_inputs)
        values = placeholder_values(gm, example_inputs)
        found["linears"] = {v.meta.name: (v.layout, v.bias, dense_weight(gm, v, values)) for v in views}
        frame = captured_frame(gm)  # None for symbolic_trace
        found["unknown"] = unrecognised_linears(gm, views, frame and frame.locals)
        return gm.forward

    if capture == "dynamo":
        torch.compile(net, backend=backend, fullgraph=True)(x)
    else:
        gm = fx.symbolic_trace(net)
        backend(gm, [x])
    assert set(found["linears"]) == {"a", "b", "c"}
    # a symbolic_trace GraphModule keeps d's weight on a plain Module: only Dynamo's sources name the nn.Linear
    assert list(found["unknown"]) == (["d"] if capture == "dynamo" else [])
    assert capture != "dynamo" or found["unknown"]["d"] is net.d
    for name, (layout, bias, weight) in found["linears"].items():
        assert layout is WeightLayout.LINEAR and bias is None  # a's bias stays the graph's own add
        assert torch.equal(weight, getattr(net, name).weight)
