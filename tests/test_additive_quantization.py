"""AQLM's fit of one matrix (passes.additive_quantization) and the round-to-nearest baseline."""

from __future__ import annotations

import pytest
import torch

from lrcompile.errors import LowRankConfigError
from lrcompile.kernels.aq_linear import code_indices, dequantize
from lrcompile.passes import additive_quantization as aq
from lrcompile.passes.round_to_nearest import round_to_nearest, rtn_bits_per_weight
from lrcompile.types import AQSpec


def _gram(width: int, seed: int = 0) -> torch.Tensor:
    """A correlated, positive definite input Gram X^T X (tokens as rows)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * width, width, generator=generator, dtype=torch.float64)
    x = x @ (torch.eye(width, dtype=torch.float64) + 0.3 * torch.randn(width, width, generator=generator, dtype=torch.float64))
    return x.T @ x


def _weight(out: int, inp: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


def test_a_weight_whose_groups_are_codewords_is_recovered_exactly():
    """Groups that ARE the codewords of one codebook (times a row scale): the fit finds them, error ~0."""
    generator = torch.Generator().manual_seed(0)
    hadamard = torch.tensor([[1.0, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]])  # unit-RMS codewords
    codes = torch.randint(0, 4, (24, 8, 1), generator=generator, dtype=torch.uint8)
    scales = 0.5 + torch.rand(24, generator=generator)
    weight = dequantize(codes, hadamard[None], scales)
    fit = aq.fit_additive_quantization(weight, _gram(32), AQSpec(1, 2, 4))
    assert fit.relative_error < 1e-9
    torch.testing.assert_close(dequantize(fit.codes, fit.codebooks, fit.scales), weight, rtol=0, atol=1e-5)


@pytest.mark.parametrize("beam", [1, 3])
def test_beam_search_never_increases_the_gram_weighted_error(beam):
    weight, gram = _weight(16, 32), _gram(32).float()
    spec = AQSpec(2, 4, 8)
    books = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(2))
    codes = torch.randint(0, 16, (16, 4, 2), generator=torch.Generator().manual_seed(3))
    ones = torch.ones(16)
    before = aq.relative_error(weight - aq._reconstruct(books, codes, ones), weight, gram)
    after_codes = aq._beam_search(weight, gram, books, codes, beam)
    after = aq.relative_error(weight - aq._reconstruct(books, after_codes, ones), weight, gram)
    assert after < 0.9 * before
    assert aq.relative_error(weight - aq._reconstruct(books, aq._beam_search(weight, gram, books, after_codes, beam),
                                                      ones), weight, gram) <= after + 1e-9
    assert spec.codebooks == after_codes.shape[-1]


def test_a_beam_holding_every_code_tuple_finds_each_rows_optimum():
    """With one group per row and a beam of K^(M-1)... K^M tuples the search is exhaustive: it finds the best
    pair of codewords under the Gram-weighted error (brute force), where greedy (beam 1) may not."""
    weight, gram = _weight(32, 8), _gram(8).float()
    books = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(4))
    pairs = torch.cartesian_prod(torch.arange(8), torch.arange(8))  # [64, 2]
    words = books[0][pairs[:, 0]] + books[1][pairs[:, 1]]  # [64, g]
    delta = weight[:, None, :] - words[None]
    optimum = torch.einsum("rpi,ij,rpj->rp", delta, gram, delta).amin(1)

    def error(beam: int) -> torch.Tensor:
        codes = aq._beam_search(weight, gram, books, torch.zeros(32, 1, 2, dtype=torch.int64), beam)
        d = weight - aq._reconstruct(books, codes, torch.ones(32))
        return ((d @ gram) * d).sum(1)

    torch.testing.assert_close(error(64), optimum, rtol=1e-4, atol=1e-3)
    assert float(error(1).sum()) > float(optimum.sum()) * 1.001


def test_adam_on_codebooks_and_scales_lowers_the_error_with_codes_fixed():
    weight, gram = _weight(16, 32), _gram(32).float()
    books = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(2))
    codes = aq._beam_search(weight, gram, books, torch.zeros(16, 4, 2, dtype=torch.int64), 1)
    scales = torch.ones(16)
    before = aq.relative_error(weight - aq._reconstruct(books, codes, scales), weight, gram)
    books2, scales2 = aq._adam(weight, gram, books, scales, codes, steps=30, lr=1e-2)
    assert aq.relative_error(weight - aq._reconstruct(books2, codes, scales2), weight, gram) < 0.95 * before


def test_the_fit_improves_on_its_initialisation_and_beats_rtn_at_more_bits():
    """Rounds of beam search + Adam lower the error of residual k-means; 2 bits of AQ codes beat 3-bit RTN
    (g=16) in output error on a correlated Gram."""
    weight, gram = _weight(48, 64), _gram(64)
    fit = aq.fit_additive_quantization(weight, gram, AQSpec(2, 6, 8), tolerance=0.0, max_rounds=4)
    assert fit.relative_error < 0.9 * fit.errors[0]
    assert fit.relative_error == pytest.approx(min(fit.errors), rel=1e-3)  # the best round's, codebooks rounded
    dense = dequantize(fit.codes, fit.codebooks, fit.scales)
    assert fit.relative_error == pytest.approx(aq.relative_error(dense - weight, weight, gram), rel=1e-4)
    assert fit.codes.dtype == torch.uint8 and fit.codes.shape == (48, 8, 2) and fit.codebooks.shape == (2, 64, 8)


def test_codes_over_eight_bits_are_stored_as_int16_low_bits():
    spec = AQSpec(1, 16, 8)
    indices = torch.tensor([0, 1, 2**15 - 1, 2**15, 2**16 - 1])
    stored = aq.storage_codes(indices, spec)
    assert stored.dtype == torch.int16 and torch.equal(code_indices(stored), indices)
    assert aq.storage_codes(torch.tensor([0, 255]), AQSpec(2, 8, 8)).dtype == torch.uint8


def test_a_group_size_that_does_not_divide_the_width_names_the_layer():
    with pytest.raises(LowRankConfigError, match=r"option 'aq_group_size'=12 does not divide the input width 64 of layer 'mlp.up'"):
        aq.check_shape(AQSpec(2, 8, 12), 32, 64, "mlp.up")


def test_rtn_is_exact_on_the_grid_and_within_half_a_step_elsewhere():
    weight = _weight(8, 100)  # 100 = 64 + a short last group of 36
    out = round_to_nearest(weight, 4, 64)
    for group in (slice(0, 64), slice(64, 100)):
        part = weight[:, group]
        step = (part.amax(1) - part.amin(1)) / 15
        assert bool(((out[:, group] - part).abs() <= step[:, None] / 2 + 1e-6).all())
    assert torch.equal(round_to_nearest(out, 4, 64), out)  # already on the grid
    assert len(torch.unique(round_to_nearest(weight, 2, 100)[0])) <= 4
    assert rtn_bits_per_weight(3, 128, 576) == pytest.approx(3 + 32 * 5 / 576)


def test_sixteen_bit_codes_fit_store_as_int16_and_run_through_the_op():
    """1x16 (2^16 codewords): codes above 2^15 survive the int16 storage; the AQLinear computes x W^T."""
    from lrcompile.modules import AQLinear

    weight = _weight(8, 16)
    fit = aq.fit_additive_quantization(weight, _gram(16), AQSpec(1, 16, 8), max_rounds=2)
    assert fit.codes.dtype == torch.int16 and fit.codebooks.shape == (1, 2**16, 8)
    assert fit.relative_error < 0.05  # 16 groups, 65536 codewords: nearly every group gets its own
    module = AQLinear.from_codes(fit.codes, fit.codebooks, fit.scales, None)
    assert module.spec == AQSpec(1, 16, 8)
    x = torch.randn(2, 16)
    torch.testing.assert_close(module(x), x @ dequantize(fit.codes, fit.codebooks, fit.scales).T)


@pytest.mark.parametrize("dtype,stored", [(torch.float32, torch.float16), (torch.float16, torch.float16),
                                          (torch.bfloat16, torch.bfloat16)], ids=["f32", "f16", "bf16"])
def test_codebooks_are_stored_in_16_bits_and_the_error_is_that_of_the_stored_tensors(dtype, stored):
    """Codebooks come back in 16 bits whatever the weight's dtype (bfloat16 stays bfloat16, the rest float16),
    scales in the weight's dtype; ``relative_error`` is that of those rounded tensors, not of the float32 fit."""
    weight = _weight(32, 64).to(dtype)
    fit = aq.fit_additive_quantization(weight, None, AQSpec(2, 6, 8), max_rounds=2)  # G = I: no ridge term
    assert fit.codebooks.dtype == stored and fit.scales.dtype == dtype
    dense = dequantize(fit.codes, fit.codebooks.double(), fit.scales.double())
    stored_error = aq.relative_error(dense - weight.double(), weight, torch.eye(64))
    assert fit.relative_error == pytest.approx(stored_error, rel=1e-9, abs=0)
    assert min(abs(e / stored_error - 1) for e in fit.errors) > 1e-7  # the float32 rounds' errors are not it
