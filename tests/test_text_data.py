"""Calibration text every machine has (lrcompile.text_data): stable, split, and long enough to train on."""

from __future__ import annotations

from lrcompile.text_data import stdlib_sentences


def test_more_sentences_only_append_and_the_splits_barely_meet():
    """The packages' docstrings follow the top-level modules', so a larger ``limit`` keeps every earlier batch
    (the benchmarks' figures stay comparable) and reaches past what the top-level modules hold."""
    calibration, heldout = stdlib_sentences("calibration", 10**6), stdlib_sentences("heldout", 10**6)
    assert stdlib_sentences("calibration", 3000) == calibration[:3000]
    assert stdlib_sentences("heldout", 500) == heldout[:500]
    assert len(calibration) > 6000 and len(heldout) > 1500  # the top-level modules alone give ~3,600 and ~600
    assert len(set(calibration) & set(heldout)) < 0.05 * len(heldout)  # files are split; stock sentences recur
    assert all(6 <= len(s.split()) <= 40 for s in calibration + heldout)
