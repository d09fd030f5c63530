"""Accuracy guard on a trained Llama: compression is exact at full rank, and activation-aware methods beat plain SVD.

The ``tiny`` fixture of ``benchmarks.fixtures`` (a Llama with grouped-query
attention trained on the Python standard library's source) is trained on first
use and cached (``$LRCOMPILE_CACHE``); calibration comes from its train split,
evaluation from its held-out split. Every compile gets a fresh model (the
backend releases dense weights) and a fresh Dynamo; the graph is captured with
static shapes, so every evaluation batch has the calibration batches' shape.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

import lrcompile
from benchmarks.fixtures import (
    Fixture,
    calibration_chunks,
    free_threads,
    heldout_chunks,
    is_heldout,
    load_fixture,
    num_threads,
    perplexity,
    stdlib_files,
)

log = logging.getLogger(__name__)

SEQ_LEN, BATCH = 128, 8
CALIBRATION_BATCHES, EVAL_BATCHES = 4, 8
# Uniform ratio at which compression matters on the tiny fixture (plain SVD loses ~20% perplexity) and ASVD's
# advantage is above noise: at 0.7 ASVD beat plain SVD on each of 8 tiny-sized models trained while choosing this
# recipe (3 seeds; 400-1000 steps; batch 8/16; seq 64/128; hidden 96/128), by 0.25-1.2% perplexity, 1.7-10 standard
# errors of the paired per-batch difference. At 0.6 the rank-8 k/v projections dominate the error and ASVD lost on
# one seed of 3. Whitening beat plain SVD by 1.3-6% on all of them.
RATIO = 0.7


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module", autouse=True)
def _threads():
    """Only the idle cores: on a busy machine, spinning OpenMP workers make this module ~5x slower."""
    with num_threads(free_threads()):
        yield


@pytest.fixture(scope="module")
def tiny() -> Fixture:
    return load_fixture("tiny")


@pytest.fixture(scope="module")
def calibration(tiny) -> list[torch.Tensor]:
    return calibration_chunks(tiny, SEQ_LEN, CALIBRATION_BATCHES, BATCH)


@pytest.fixture(scope="module")
def evaluation(tiny) -> list[torch.Tensor]:
    return heldout_chunks(tiny, SEQ_LEN, EVAL_BATCHES, BATCH)


def _compile(model, calibration, ratio, method):
    torch._dynamo.reset()
    options = lrcompile.LowRankConfig(calibration=calibration, param_ratio=ratio, method=method, allocation="uniform",
                                      compiler="eager")
    return torch.compile(model, backend="lowrank", fullgraph=True, options=options)


def _forward(module):
    return lambda ids: module(input_ids=ids).logits


def test_chunks_are_fixed_shape_deterministic_and_from_disjoint_files(tiny, calibration, evaluation):
    for chunk in (*calibration, *evaluation):
        assert chunk.shape == (BATCH, SEQ_LEN) and chunk.dtype == torch.int64
    assert all(torch.equal(a, b) for a, b in zip(evaluation, heldout_chunks(tiny, SEQ_LEN, EVAL_BATCHES, BATCH)))
    assert int(max(c.max() for c in (*calibration, *evaluation))) < tiny.recipe.vocab
    heldout = [p.name for p in stdlib_files() if is_heldout(p)]
    assert heldout and len(heldout) < len(stdlib_files()) / 4
    assert tiny.info["files"]["heldout"] == len(heldout)


def test_ratio_one_reproduces_dense_logits_and_perplexity(tiny, calibration, evaluation):
    model = tiny.load_model()
    with torch.no_grad():
        dense_logits = [model(input_ids=ids).logits for ids in evaluation]
        dense_ppl = perplexity(_forward(model), evaluation)
        compiled = _compile(model, calibration, 1.0, "asvd")
        logits = [compiled(input_ids=ids).logits for ids in evaluation]
        ppl = perplexity(_forward(compiled), evaluation)
    worst = max((a - b).abs().max().item() for a, b in zip(logits, dense_logits))
    log.info("ratio 1.0: max |logit diff| %.2e, perplexity %.6f (dense %.6f)", worst, ppl, dense_ppl)
    assert worst <= 1e-4
    assert math.isclose(ppl, dense_ppl, rel_tol=1e-6)
    assert lrcompile.model_report(model).totals()["factored"] == 0


def test_activation_aware_methods_beat_plain_svd(tiny, calibration, evaluation):
    model = tiny.load_model()
    dense_ppl = perplexity(_forward(model), evaluation)
    ppl = {}
    for method in ("svd", "asvd", "whiten"):
        model = tiny.load_model()
        compiled = _compile(model, calibration, RATIO, method)
        ppl[method] = perplexity(_forward(compiled), evaluation)
        totals = lrcompile.model_report(model).totals()
        # every linear of the decoder layers (q, k, v, o, gate, up, down) factored; lm_head stays dense
        assert totals["factored"] == 7 * tiny.recipe.layers and totals["param_ratio"] <= RATIO
    summary = ", ".join(f"{m} {p:.3f}" for m, p in ppl.items())
    log.info("held-out perplexity at param_ratio %.2f: dense %.3f, %s", RATIO, dense_ppl, summary)
    print(f"\nheld-out perplexity at param_ratio {RATIO}: dense {dense_ppl:.3f}, {summary}")
    assert all(math.isfinite(p) for p in ppl.values())
    assert ppl["svd"] > 1.1 * dense_ppl, f"compression at {RATIO} barely matters ({summary}, dense {dense_ppl:.3f})"
    assert ppl["asvd"] < ppl["svd"], summary
    assert ppl["whiten"] < ppl["svd"], summary
