"""Sequential calibration with error feedback: the refit's closed form, the step-by-step streams, the option."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import lrcompile
from lrcompile.errors import LowRankConfigError
from lrcompile.passes import CalibrationRunner, Whitening, decompose, find_linears
from lrcompile.passes.sequential_calibration import sequential_steps
from lrcompile.types import ActivationStats
from tiny_models import tiny_rope_model, token_batches


def _stats(rows: torch.Tensor) -> ActivationStats:
    stats = ActivationStats.empty(rows.shape[1])
    stats.add_rows(rows)
    return stats


def _problem(seed: int = 0, n: int = 200, d_in: int = 12, d_out: int = 9):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, dtype=torch.float64, generator=g)
    x = torch.randn(n, d_in, dtype=torch.float64, generator=g) * torch.linspace(0.1, 3, d_in, dtype=torch.float64)
    x_hat = x + 0.3 * torch.randn(n, d_in, dtype=torch.float64, generator=g)  # inputs after an upstream error
    return w, x, x_hat


def test_refit_is_the_least_squares_solution_at_full_rank_and_its_optimal_truncation_below():
    """Without ridge: ||X W^T - X^ Wh^T||^2 = ||X W^T - X^ W*^T||^2 + the dropped squared singular values of W* L."""
    w, x, x_hat = _problem()
    d = decompose(w, "whiten", whitening=Whitening.of(_stats(x_hat), "fc", x.T @ x_hat, ridge=0.0))
    w_star = torch.linalg.lstsq(x_hat, x @ w.T).solution.T  # min ||X^ W*^T - X W^T||
    assert torch.allclose(d.reconstruct(d.full_rank, torch.float64), w_star, atol=1e-9)
    floor = (x @ w.T - x_hat @ w_star.T).square().sum()
    plain = decompose(w, "whiten", _stats(x_hat))  # whitened on X^ alone: fits W X^, not W X
    for rank in (2, 5, 8):
        loss = (x @ w.T - x_hat @ d.reconstruct(rank, torch.float64).T).square().sum()
        assert torch.allclose(loss, floor + d.s[rank:].square().sum(), rtol=1e-9)
        assert loss < (x @ w.T - x_hat @ plain.reconstruct(rank, torch.float64).T).square().sum()


def test_the_ridge_refit_minimises_the_output_error_plus_the_ridge_term():
    """W* = argmin ||X W^T - X^ Wh^T||^2 + l ||Wh - W||^2, l = ridge * mean(diag X^T X^): a stacked least squares."""
    w, x, x_hat = _problem(seed=2)
    ridge = 0.3
    d = decompose(w, "whiten", whitening=Whitening.of(_stats(x_hat), "fc", x.T @ x_hat, ridge=ridge))
    root = (ridge * (x_hat.T @ x_hat).diagonal().mean()).sqrt()
    eye = torch.eye(w.shape[1], dtype=torch.float64)
    w_ridge = torch.linalg.lstsq(torch.cat([x_hat, root * eye]), torch.cat([x @ w.T, root * w.T])).solution.T
    assert torch.allclose(d.reconstruct(d.full_rank, torch.float64), w_ridge, atol=1e-9)


def test_without_upstream_error_the_refit_is_plain_whitening_and_exact_at_full_rank():
    w, x, _ = _problem(seed=1)
    refit = decompose(w, "whiten", whitening=Whitening.of(_stats(x), "fc", x.T @ x))
    plain = decompose(w, "whiten", _stats(x))
    assert torch.allclose(refit.s, plain.s, rtol=1e-9)
    assert torch.allclose(refit.reconstruct(4, torch.float64), plain.reconstruct(4, torch.float64), atol=1e-9)
    assert torch.allclose(refit.reconstruct(refit.full_rank, torch.float64), w, atol=1e-9)


def test_the_refit_map_is_solved_in_the_cross_buffer():
    """Error feedback's G overwrites B, so a step holds C, G and L: no fourth [in, in] buffer per step."""
    w, x, x_hat = _problem(seed=3)
    cross = x.T @ x_hat
    whitening = Whitening.of(_stats(x_hat), "fc", cross)
    assert whitening.refit.data_ptr() == cross.data_ptr()
    c = x_hat.T @ x_hat
    shift = 0.1 * c.diagonal().mean()
    eye = torch.eye(c.shape[0], dtype=torch.float64)
    assert torch.allclose(whitening.refit, (x.T @ x_hat + shift * eye) @ torch.linalg.inv(c + shift * eye), atol=1e-9)


class _Head(nn.Module):
    def forward(self, y):
        raise RuntimeError("the head ran")


class ChainModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.q, self.k, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 5)
        self.head = _Head()

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return self.head(self.fc2(torch.relu(self.q(h)) + self.k(h)))


class _KeepHead(fx.Tracer):
    def is_leaf_module(self, module: nn.Module, name: str) -> bool:
        return isinstance(module, _Head) or super().is_leaf_module(module, name)


def _traced() -> tuple[ChainModel, fx.GraphModule]:
    model = ChainModel().eval()
    return model, fx.GraphModule(model, _KeepHead().trace(model))


def _batches():
    g = torch.Generator().manual_seed(2)
    return [torch.randn(3, 4, 6, generator=g) for _ in range(3)]


def test_steps_share_an_input_see_the_compressed_prefix_and_stop_before_the_rest_of_the_graph():
    model, gm = _traced()
    linears = find_linears(gm)
    assert [v.meta.name for v in linears] == ["fc1", "q", "k", "fc2"]
    runner = CalibrationRunner(gm)
    batches = _batches()
    fc1 = linears[0]
    down, up = decompose(model.fc1.weight, "svd").factors(2, torch.float32)  # fc1 at rank 2
    steps = []
    for step in sequential_steps(runner, batches, linears, cross=True):  # the head raises: nothing after fc2's input runs
        steps.append((step.input, [v.meta.name for v in step.linears], step.stats, step.cross))
        if step.linears[0] is fc1:
            step.factors[fc1] = (down, up)
    assert [names for _, names, _, _ in steps] == [["fc1"], ["q", "k"], ["fc2"]]
    with torch.no_grad():
        x = torch.cat([b.reshape(-1, 6) for b in batches]).double()
        h = torch.tanh(model.fc1(x.float())).double()
        h_hat = torch.tanh(x.float() @ down.T @ up.T + model.fc1.bias).double()
    _, _, stats, cross = steps[1]  # q/k: dense h against the compressed prefix's h^
    assert stats.rows == x.shape[0]
    assert torch.allclose(stats.gram, h_hat.T @ h_hat, atol=1e-4)
    assert torch.allclose(cross, h.T @ h_hat, atol=1e-4)
    assert not torch.allclose(cross, stats.gram, atol=1e-2)


def test_a_dense_only_pass_observes_the_dense_inputs():
    _, gm = _traced()
    linears = find_linears(gm)
    steps = list(sequential_steps(CalibrationRunner(gm), _batches(), linears, compressed=False))
    x = torch.cat([b.reshape(-1, 6) for b in _batches()]).double()
    assert steps[0].cross is None and torch.allclose(steps[0].stats.gram, x.T @ x, atol=1e-4)


@pytest.mark.parametrize("options, match", [
    ({"calibration_order": "backwards", "method": "whiten"},
     r"'calibration_order'='backwards' is not one of 'independent', 'sequential', 'error_feedback'"),
    ({"calibration_order": "sequential", "method": "asvd"}, r"calibration_order='sequential' .* needs method='whiten' \(got method='asvd'\)"),
    ({"calibration_order": "error_feedback", "method": "svd"}, r"calibration_order='error_feedback' .* needs method='whiten'"),
])
def test_bad_calibration_order_options_are_named(options, match):
    with pytest.raises(LowRankConfigError, match=match):
        lrcompile.LowRankConfig(**options)


def _output_error(order: str) -> tuple[float, list]:
    """Relative squared logit error of the compressed tiny Llama on its calibration batches, and its ranks.

    On the batches the refit is fit to: that is the error it minimises layer by layer. (A random-weight
    model's activations carry no structure that would carry over to other random tokens.)"""
    torch._dynamo.reset()
    model = tiny_rope_model("llama")
    calibration = token_batches(6, 4, 32)
    with torch.no_grad():
        dense = [model(b).logits for b in calibration]
        config = lrcompile.LowRankConfig(calibration=calibration, param_ratio=0.4, method="whiten",
                                         allocation="uniform", calibration_order=order, compiler="eager")
        compiled = torch.compile(model, backend="lowrank", options=config)
        out = [compiled(b).logits for b in calibration]
    torch._dynamo.reset()
    ranks = [(layer.name, layer.rank) for layer in lrcompile.model_report(model).layers]
    error = sum((o - d).square().sum() for o, d in zip(out, dense)) / sum(d.square().sum() for d in dense)
    return float(error), ranks


def test_error_feedback_lowers_the_output_error_of_a_tiny_llama_at_the_same_ranks():
    independent, ranks = _output_error("independent")
    sequential, sequential_ranks = _output_error("sequential")
    feedback, feedback_ranks = _output_error("error_feedback")
    assert ranks == sequential_ranks == feedback_ranks and any(rank for _, rank in ranks)
    assert feedback < 0.85 * min(independent, sequential), (feedback, sequential, independent)
