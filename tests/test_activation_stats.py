"""Unit tests of passes/activation_stats.py: observers, calibration, statistics, NaN detection."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from lrcompile.errors import CalibrationError
from lrcompile.passes import CalibrationRunner, calibrate, collect_stats, find_linears, insert_observers
from lrcompile.passes.activation_stats import OBSERVER_PREFIX, ActivationObserver
from lrcompile.types import ActivationStats


class MLP(nn.Module):
    def __init__(self, log_between: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 5)
        self.head = nn.Linear(5, 3)
        self.log_between = log_between

    def forward(self, x):
        h = self.fc1(x)
        h = torch.log(h) if self.log_between else torch.relu(h)  # log: NaN appears after fc1 only
        return self.head(torch.tanh(self.fc2(h)))


def _direct_inputs(model: MLP, batches):
    """Input rows of each linear, computed eagerly with the same float32 ops, as float64."""
    rows = {"fc1": [], "fc2": [], "head": []}
    with torch.no_grad():
        for x in batches:
            h1 = model.fc1(x)
            h1 = torch.log(h1) if model.log_between else torch.relu(h1)
            h2 = torch.tanh(model.fc2(h1))
            for name, t in (("fc1", x), ("fc2", h1), ("head", h2)):
                rows[name].append(t.reshape(-1, t.shape[-1]).double())
    return {k: torch.cat(v) for k, v in rows.items()}


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4 + i, 6, generator=g) for i in range(n)]  # varying sequence length


def _observer_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith(OBSERVER_PREFIX)]


def test_activation_stats_update_matches_direct():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 5, 4, generator=g), torch.randn(7, 4, generator=g, dtype=torch.float64)
    stats = ActivationStats.empty(4)
    stats.update(a)
    stats.update(b)
    rows = torch.cat([a.reshape(-1, 4).double(), b])
    assert stats.rows == 22
    torch.testing.assert_close(stats.mean_abs, rows.abs().mean(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(stats.abs_max, rows.abs().amax(0), rtol=0, atol=0)
    torch.testing.assert_close(stats.gram, rows.T @ rows, rtol=1e-12, atol=1e-12)
    assert stats.gram.dtype == stats.abs_sum.dtype == torch.float64
    assert stats.is_finite()


@pytest.mark.parametrize("driver", ["runner", "direct_call"])
def test_observers_collect_exact_statistics(driver):
    torch.manual_seed(0)
    model = MLP()
    gm = fx.symbolic_trace(model)
    batches = _batches()
    reference = [gm(x) for x in batches]
    views = find_linears(gm)
    insert_observers(gm, views)
    observers = _observer_nodes(gm)
    assert len(observers) == 3
    assert all(isinstance(gm.get_submodule(n.target), ActivationObserver) for n in observers)
    # every linear now reads its input through an observer
    assert all(v.node.args[0].op == "call_module" and v.node.args[0].target.startswith(OBSERVER_PREFIX) for v in views)
    if driver == "runner":
        calibrate(CalibrationRunner(gm, [batches[0]]), batches, total=len(batches))
    else:
        with torch.no_grad():
            for x in batches:
                gm(x)
    collect_stats(gm, views)

    direct = _direct_inputs(model, batches)
    for view in views:
        stats = view.meta.stats
        rows = direct[view.meta.name]
        assert stats.rows == rows.shape[0] == sum(x.shape[0] * x.shape[1] for x in batches)
        torch.testing.assert_close(stats.mean_abs, rows.abs().mean(0), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(stats.abs_max, rows.abs().amax(0), rtol=0, atol=0)
        torch.testing.assert_close(stats.gram, rows.T @ rows, rtol=1e-12, atol=1e-12)

    # observers are gone and outputs are unchanged
    assert _observer_nodes(gm) == []
    assert not any(name.startswith(OBSERVER_PREFIX) for name, _ in gm.named_modules())
    assert OBSERVER_PREFIX not in gm.code
    for x, ref in zip(batches, reference):
        assert torch.equal(gm(x), ref)


def test_observers_do_not_change_outputs_while_inserted():
    model = MLP()
    gm = fx.symbolic_trace(model)
    x = _batches(1)[0]
    ref = gm(x)
    views = find_linears(gm)
    insert_observers(gm, views)
    assert torch.equal(gm(x), ref)
    collect_stats(gm, views)


def test_observers_inserted_twice_are_refused_so_no_row_counts_twice():
    gm = fx.symbolic_trace(MLP())
    views = find_linears(gm)
    insert_observers(gm, views)
    with pytest.raises(CalibrationError, match="already holds 3 observer.*collect_stats"):
        insert_observers(gm, views)
    gm(_batches(1)[0])
    collect_stats(gm, views)
    assert {v.meta.stats.rows for v in views if v.meta.stats is not None} == {8}
    insert_observers(gm, views)  # a fresh round after collecting
    assert len(_observer_nodes(gm)) == 3


def test_only_compressible_linears_are_observed():
    model = MLP()
    gm = fx.symbolic_trace(model)
    views = find_linears(gm, None, ("*",), ("head",))
    insert_observers(gm, views)
    assert len(_observer_nodes(gm)) == 2
    gm(_batches(1)[0])
    collect_stats(gm, views)
    names = {v.meta.name: v.meta.stats for v in views}
    assert names["head"] is None
    assert names["fc1"].rows == names["fc2"].rows == 8


def test_nan_input_names_first_layer_and_removes_observers():
    model = MLP()
    gm = fx.symbolic_trace(model)
    views = find_linears(gm)
    insert_observers(gm, views)
    batches = _batches()
    batches[1][0, 2, 3] = float("nan")
    calibrate(CalibrationRunner(gm), batches)
    with pytest.raises(CalibrationError, match=r"layer 'fc1'") as info:
        collect_stats(gm, views)
    assert "'fc2'" not in str(info.value) and "'head'" not in str(info.value)
    assert _observer_nodes(gm) == []
    assert not any(name.startswith(OBSERVER_PREFIX) for name, _ in gm.named_modules())


def test_a_batch_of_the_wrong_width_names_the_layer_and_its_width():
    gm = fx.symbolic_trace(MLP())
    views = find_linears(gm)
    insert_observers(gm, views)
    with pytest.raises(CalibrationError, match=r"layer 'fc1' takes inputs of width 6, but a calibration batch gives "
                                               r"it a tensor of shape \[2, 4, 8\]"):
        calibrate(CalibrationRunner(gm), [torch.randn(2, 4, 8)])


def test_nan_arising_inside_graph_names_first_affected_layer():
    model = MLP(log_between=True)  # log of negative pre-activations: NaN enters fc2, not fc1
    gm = fx.symbolic_trace(model)
    views = find_linears(gm)
    insert_observers(gm, views)
    batches = _batches()
    calibrate(CalibrationRunner(gm), batches)
    with pytest.raises(CalibrationError, match=r"layer 'fc2'") as info:
        collect_stats(gm, views)
    assert "'fc1'" not in str(info.value)
    assert views[0].meta.stats.is_finite()
    assert _observer_nodes(gm) == []


def test_inf_input_is_reported():
    gm = fx.symbolic_trace(MLP())
    views = find_linears(gm)
    insert_observers(gm, views)
    x = _batches(1)[0]
    x[0, 0, 0] = float("inf")
    gm(x)
    with pytest.raises(CalibrationError, match="'fc1'.*NaN or Inf"):
        collect_stats(gm, views)


def test_layer_reached_by_no_row_is_reported():
    gm = fx.symbolic_trace(MLP())
    views = find_linears(gm)
    insert_observers(gm, views)
    with pytest.raises(CalibrationError, match="no calibration data reached layer 'fc1'"):
        collect_stats(gm, views)
    assert _observer_nodes(gm) == []


def test_calibrate_empty_raises():
    gm = fx.symbolic_trace(MLP())
    with pytest.raises(CalibrationError, match="empty"):
        calibrate(CalibrationRunner(gm), [])


def test_padding_rows_are_left_out_of_the_statistics():
    """Rows whose attention_mask is 0 do not enter mean|x|, max|x| or X^T X."""
    from lrcompile.passes import CalibrationRunner, calibrate, collect_stats, find_linears, insert_observers

    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x, attention_mask):
            return self.fc(x) * attention_mask.unsqueeze(-1)

    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(Masked())
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    x[mask == 0] = 1e3  # padding rows, far from the real ones
    views = find_linears(gm)
    insert_observers(gm, views)
    calibrate(CalibrationRunner(gm), [{"x": x, "attention_mask": mask}])
    collect_stats(gm, views)
    real = x[mask == 1].double()
    stats = views[0].meta.stats
    assert stats.rows == 7
    torch.testing.assert_close(stats.mean_abs, real.abs().mean(0))
    torch.testing.assert_close(stats.gram, real.T @ real)


class SharedInput(nn.Module):
    """q and k read the same tensor (as after one norm in attention); o reads their sum."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.o = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.o(self.q(x) + self.k(x))


def test_linears_reading_one_input_share_one_observer_and_one_statistics_object():
    gm = fx.symbolic_trace(SharedInput().eval())
    linears = find_linears(gm)
    insert_observers(gm, linears)
    assert len(_observer_nodes(gm)) == 2  # x, and q + k
    batches = _batches()
    calibrate(CalibrationRunner(gm), batches)
    collect_stats(gm, linears)
    q, k, o = (v.meta.stats for v in linears)
    assert q is k and q is not o
    rows = torch.cat([b.reshape(-1, 6) for b in batches]).double()
    assert q.rows == rows.shape[0] and torch.allclose(q.gram, rows.T @ rows, atol=1e-4)
    assert not _observer_nodes(gm) and not [m for m in gm.modules() if isinstance(m, ActivationObserver)]
