"""Sensitivity measurement: the float32 output KL against float64, and one trial per distinct rank."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_rope_model, token_batches
from torch import fx, nn

import lrcompile
import lrcompile.pipeline as pipeline
from lrcompile.passes import CalibrationRunner, OutputReference, decompose, dense_weight, find_linears, rank_for_ratio
from lrcompile.passes.find_linears import placeholder_values
from lrcompile.passes.sensitivity import measure_sensitivity

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _float64_kl(dense: torch.Tensor, output: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over the real positions of KL(softmax(dense) || softmax(output)), all in float64."""
    p, q = F.log_softmax(dense.double(), -1), F.log_softmax(output.double(), -1)
    return float((p.exp() * (p - q)).sum(-1)[mask.bool()].mean())


@pytest.mark.parametrize("scale", [1e-3, 1e-2, 1e-1, 1.0])
def test_output_kl_matches_float64_on_a_bert_sized_vocabulary(scale):
    generator = torch.Generator().manual_seed(0)
    # logits of a trained LM's size: offset, spread, and a few likely tokens per position
    dense = torch.randn(2, 64, 30522, generator=generator) * 2.5 + 5
    dense[..., :50] += 8
    output = dense + scale * torch.randn(dense.shape, generator=generator)
    mask = torch.ones(2, 64, dtype=torch.long)
    mask[1, :20] = 0  # left padding: not compared
    reference = OutputReference.from_output(dense, mask)
    expected = _float64_kl(dense, output, mask)
    assert abs(reference.kl(output) - expected) <= 1e-7 + 1e-5 * expected
    assert reference.kl(dense) == 0.0


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 24)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_weight_sensitivity_runs_one_trial_per_distinct_rank():
    torch.manual_seed(0)
    gm = fx.symbolic_trace(_MLP().eval())
    views = find_linears(gm)
    runner = CalibrationRunner(gm)
    runs = []
    run = runner.run
    runner.run = lambda *args, **kw: runs.append(kw.get("overrides")) or run(*args, **kw)
    batches = [torch.randn(4, 32), torch.randn(4, 32)]
    values = placeholder_values(gm, None)
    measure_sensitivity(runner, views, lambda v: decompose(dense_weight(gm, v, values), "svd"), RATIOS, batches, 8)

    ranks = [{ratio: rank_for_ratio(v.meta, ratio, 8) for ratio in RATIOS} for v in views]
    distinct = [set(r.values()) - {None} for r in ranks]
    assert [sorted(d) for d in distinct] == [[8, 16], [8]]  # 9 ratios, 3 distinct truncations
    assert runs.count(None) == len(batches)  # the dense reference, once per batch
    assert len(runs) == len(batches) * (1 + sum(len(d) for d in distinct))
    for view, by_ratio in zip(views, ranks):
        for ratio, rank in by_ratio.items():
            same = [view.meta.sensitivity[r] for r, k in by_ratio.items() if k == rank]
            assert view.meta.sensitivity[ratio] == same[0] and (rank is not None or same[0] == 0.0)


def test_kv_sensitivity_skips_full_width_ranks_and_repeats(monkeypatch):
    curves, trials = {}, []
    measure = pipeline.measure_kv_sensitivity
    monkeypatch.setattr(pipeline, "measure_kv_sensitivity", lambda *a: curves.update(measure(*a)) or curves)
    run = CalibrationRunner.run
    monkeypatch.setattr(CalibrationRunner, "run", lambda self, *a, **kw: trials.extend([1] if kw.get("overrides") else [])
                        or run(self, *a, **kw))
    model = tiny_rope_model("llama")  # 2 KV heads of width 16
    calibration = token_batches(2, seq=12)
    config = lrcompile.LowRankConfig(param_ratio=1.0, kv_ratio=0.5, kv_allocation="sensitivity", kv_group_size=1,
                                     method="asvd", compiler="eager", calibration=calibration, sensitivity_batches=2)
    torch.compile(model, backend="lowrank", options=config)(calibration[0], use_cache=False)
    # per projection, ratios 0.1-0.7 round to rank 8 (one trial per batch); 0.8 and 0.9 to the full width 16 (exact)
    assert len(curves) == 4 and len(trials) == 4 * 2
    for curve in curves.values():
        assert curve[0.8] == curve[0.9] == 0.0
        assert len({curve[r] for r in RATIOS[:7]}) == 1 and curve[0.1] > 0.0
