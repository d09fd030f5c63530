"""Unit tests of lrcompile/pass_manager.py: ordering by requires/provides, timings, graph dumps."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
import torch
from torch import fx, nn

from lrcompile.pass_manager import Pass, PassManager, order_passes


def _noop(ctx):
    pass


def _chain():
    return [
        Pass("find", _noop, provides=frozenset({"linears"})),
        Pass("stats", _noop, frozenset({"linears"}), frozenset({"stats"})),
        Pass("sens", _noop, frozenset({"stats"}), frozenset({"sensitivity"})),
        Pass("plan", _noop, frozenset({"stats", "sensitivity"}), frozenset({"plan"})),
        Pass("rewrite", _noop, frozenset({"plan"}), frozenset({"factored"})),
    ]


@pytest.mark.parametrize("perm", list(itertools.permutations(range(5)))[::7])
def test_order_passes_follows_dependencies_in_any_given_order(perm):
    passes = _chain()
    shuffled = [passes[i] for i in perm]
    assert [p.name for p in order_passes(shuffled)] == ["find", "stats", "sens", "plan", "rewrite"]


def test_order_passes_returns_pass_objects_and_keeps_ties_in_given_order():
    a = Pass("a", _noop, provides=frozenset({"x"}))
    b = Pass("b", _noop, frozenset({"x"}))
    c = Pass("c", _noop, frozenset({"x"}))
    independent = Pass("z", _noop)
    assert order_passes([c, b, independent, a]) == [independent, a, c, b]
    assert order_passes([a, b, c]) == [a, b, c]


def test_order_passes_missing_provider_raises():
    passes = [Pass("plan", _noop, frozenset({"stats"})), Pass("find", _noop, provides=frozenset({"linears"}))]
    with pytest.raises(ValueError, match=r"'plan' requires 'stats'"):
        order_passes(passes)


def test_order_passes_cycle_raises():
    passes = [
        Pass("a", _noop, frozenset({"y"}), frozenset({"x"})),
        Pass("b", _noop, frozenset({"x"}), frozenset({"y"})),
        Pass("c", _noop, provides=frozenset({"z"})),
    ]
    with pytest.raises(ValueError, match="cycle"):
        order_passes(passes)


def test_pipeline_passes_are_ordered_as_declared():
    from lrcompile.pipeline import PASSES

    ordered = order_passes(PASSES[::-1])  # the DAG, not the list order, decides
    names = [p.name for p in ordered]
    assert sorted(names) == sorted(p.name for p in PASSES)
    assert names[:3] == ["find_linears", "find_attention", "activation_stats"]
    assert names[-2:] == ["restructure_attention", "release_dense"]
    for i, p in enumerate(ordered):
        earlier = {key for q in ordered[:i] for key in q.provides}
        assert p.requires <= earlier, p.name
    assert names.index("sensitivity") < names.index("allocate_ranks") < names.index("factorize_linears")


@dataclass
class Ctx:
    gm: fx.GraphModule
    log: list = field(default_factory=list)


class Tiny(nn.Module):
    def forward(self, x):
        return x + 1


def _add_relu(ctx: Ctx):
    graph = ctx.gm.graph
    output = next(n for n in graph.nodes if n.op == "output")
    result = output.args[0]
    with graph.inserting_before(output):
        relu = graph.call_function(torch.relu, (result,))
    output.replace_input_with(result, relu)
    ctx.gm.recompile()
    ctx.log.append("add_relu")


def _record(ctx: Ctx):
    ctx.log.append("record")


def test_pass_manager_runs_in_order_times_and_dumps(tmp_path):
    ctx = Ctx(fx.symbolic_trace(Tiny()))
    dump = tmp_path / "nested" / "dump"
    passes = [
        Pass("record", _record, frozenset({"relu"})),
        Pass("add_relu", _add_relu, provides=frozenset({"relu"})),
    ]
    manager = PassManager(passes, dump)
    assert [p.name for p in manager.passes] == ["add_relu", "record"]
    manager.run(ctx, lambda c: c.gm)
    assert ctx.log == ["add_relu", "record"]
    assert set(manager.timings) == {"add_relu", "record"}
    assert all(t >= 0 for t in manager.timings.values())
    files = sorted(p.name for p in dump.iterdir())
    assert files == ["00_add_relu_after.py", "00_add_relu_before.py", "01_record_after.py", "01_record_before.py"]
    before = (dump / "00_add_relu_before.py").read_text()
    after = (dump / "00_add_relu_after.py").read_text()
    assert "add" in before and "relu" not in before
    assert "torch.relu" in after
    assert (dump / "01_record_before.py").read_text() == after
    assert (dump / "01_record_after.py").read_text() == after
    assert torch.equal(ctx.gm(torch.tensor([-3.0, 1.0])), torch.tensor([0.0, 2.0]))


def test_pass_manager_without_dump_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ctx = Ctx(fx.symbolic_trace(Tiny()))
    PassManager([Pass("add_relu", _add_relu)]).run(ctx, lambda c: c.gm)
    assert list(tmp_path.iterdir()) == []
    assert ctx.log == ["add_relu"]


def test_pass_manager_rejects_bad_dependencies_at_construction():
    with pytest.raises(ValueError, match="requires"):
        PassManager([Pass("plan", _noop, frozenset({"stats"}))])
