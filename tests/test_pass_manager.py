"""Unit tests of lrcompile/pass_manager.py: ordering by requires/provides, timings, graph dumps."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

import pytest
import torch
from torch import fx, nn

from lrcompile.pass_manager import Pass, PassManager, order_passes
from lrcompile.passes import (CalibrationRunner, calibrate, collect_stats, decompose, dense_weight, find_linears,
                              insert_observers, measure_sensitivity)


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
    assert files == ["00_add_relu_after.py", "00_add_relu_before.py", "passes.txt"]  # record changed nothing
    before = (dump / "00_add_relu_before.py").read_text()
    after = (dump / "00_add_relu_after.py").read_text()
    assert "add" in before and "relu" not in before
    assert "torch.relu" in after
    summary = (dump / "passes.txt").read_text().splitlines()
    assert [line.split(",")[0] for line in summary] == ["00 add_relu: changed", "01 record: no change"]
    assert torch.equal(ctx.gm(torch.tensor([-3.0, 1.0])), torch.tensor([0.0, 2.0]))


def test_a_failing_pass_leaves_its_graph_before_it(tmp_path):
    def fail(ctx):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        PassManager([Pass("add_relu", _add_relu), Pass("fail", fail)], tmp_path).run(Ctx(fx.symbolic_trace(Tiny())),
                                                                                    lambda c: c.gm)
    assert "torch.relu" in (tmp_path / "01_fail_before.py").read_text()
    summary = (tmp_path / "passes.txt").read_text().splitlines()
    assert summary[0].startswith("00 add_relu: changed")
    assert summary[1] == "01 fail: FAILED (RuntimeError: boom); its graph before: 01_fail_before.py"


def test_pass_manager_without_dump_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ctx = Ctx(fx.symbolic_trace(Tiny()))
    PassManager([Pass("add_relu", _add_relu)]).run(ctx, lambda c: c.gm)
    assert list(tmp_path.iterdir()) == []
    assert ctx.log == ["add_relu"]


def test_pass_manager_rejects_bad_dependencies_at_construction():
    with pytest.raises(ValueError, match="requires"):
        PassManager([Pass("plan", _noop, frozenset({"stats"}))])


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4, bias=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@dataclass
class Analysis:
    gm: fx.GraphModule
    batches: list
    views: list = field(default_factory=list)


def _find(a: Analysis):
    a.views = find_linears(a.gm, exclude=("fc2",))


def _stats(a: Analysis):
    insert_observers(a.gm, a.views)
    calibrate(CalibrationRunner(a.gm), a.batches)
    collect_stats(a.gm, a.views)


def _sensitivity(a: Analysis):
    measure_sensitivity(CalibrationRunner(a.gm), a.views, lambda v: decompose(dense_weight(a.gm, v, {}), "svd"),
                        [0.5, 0.25], a.batches, 1)


def test_dumps_of_analysis_passes_show_the_metadata_they_attach(tmp_path):
    """Analysis passes leave the code unchanged; each linear's ``node.meta["lowrank"]`` is summarised in a
    comment above its line, so their before/after dumps differ where they attached something."""
    torch.manual_seed(0)
    analysis = Analysis(fx.symbolic_trace(MLP().eval()), [torch.randn(3, 8) for _ in range(2)])
    passes = [Pass("find_linears", _find, provides=frozenset({"linears"})),
              Pass("stats", _stats, frozenset({"linears"}), frozenset({"stats"})),
              Pass("sensitivity", _sensitivity, frozenset({"stats"}))]
    PassManager(passes, tmp_path).run(analysis, lambda a: a.gm)
    dump = {p.stem: p.read_text() for p in tmp_path.iterdir()}

    assert "# lowrank" not in dump["00_find_linears_before"]
    found = dump["00_find_linears_after"].splitlines()
    fc1 = found.index("        fc1 = self.fc1(x);  x = None")
    assert found[fc1 - 1] == "        # lowrank fc1: module out=16 in=8 float32 +bias; compressible"
    fc2 = found.index("        fc2 = self.fc2(relu);  relu = None")
    assert found[fc2 - 1] == "        # lowrank fc2: module out=4 in=16 float32; not compressible (excluded by pattern 'fc2')"

    assert dump["01_stats_before"] == dump["00_find_linears_after"]
    assert "tokens" not in dump["01_stats_before"]
    assert "# lowrank fc1: module out=16 in=8 float32 +bias; compressible; stats: 6 tokens, gram [8, 8]\n" in dump["01_stats_after"]
    assert dump["01_stats_after"].count("stats:") == 1  # fc2 is not observed

    before, after = dump["02_sensitivity_before"].splitlines(), dump["02_sensitivity_after"].splitlines()
    changed = [(old, new) for old, new in zip(before, after) if old != new]
    assert len(before) == len(after) and len(changed) == 1  # fc1's note alone: fc2 is not compressible
    old, new = changed[0]
    assert re.fullmatch(re.escape(old) + r"; sensitivity \(ratio: KL\) 0\.25: \S+, 0\.5: \S+", new), new  # ratios sorted
    assert "tensor(" not in dump["02_sensitivity_after"]
