"""``lowrank::aq_linear`` (kernels/aq_linear.py): CPU kernels, fake, gradient and compile against the reference.

Every path is compared with ``aq_linear_reference`` (dequantise, then
``F.linear``) on random codes: uint8 2x8 and int16 1x16 storage (codes of
2^15 and above included), with and without bias, 1-D / 2-D / 3-D inputs,
float32 and bfloat16, one row (decode), a few, and more than the
matrix-vector kernels take (prefill). The Triton kernels are checked in
tests/test_aq_linear_triton.py.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lrcompile.kernels import aq_linear_cpu
from lrcompile.kernels.aq_linear import aq_linear_reference, dequantize
from lrcompile.kernels.aq_linear_cpu import Kernel

CONFIGS = {"2x8": (2, 8, 8), "1x16": (1, 16, 8), "1x8g4": (1, 8, 4), "2x8g4": (2, 8, 4)}  # M, B, g


def make_operands(out_features: int = 40, in_features: int = 64, config: str = "2x8",
                  dtype: torch.dtype = torch.float32, bias: bool = True, seed: int = 0,
                  books_dtype: torch.dtype | None = None):
    """Random codes over the whole code range (int16: codes >= 2^15 stored negative), codebooks (in ``books_dtype``,
    default ``dtype``) and scales."""
    books, bits, group = CONFIGS[config]
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (out_features, in_features // group, books), generator=gen)
    codes = codes.to(torch.uint8) if bits <= 8 else codes.to(torch.int16)
    codebooks = torch.randn(books, 2**bits, group, generator=gen).to(books_dtype or dtype)
    scales = (torch.rand(out_features, generator=gen) + 0.5).to(dtype)
    b = torch.randn(out_features, generator=gen).to(dtype) if bias else None
    return codes, codebooks, scales, b


def make_input(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def reference(x, codes, codebooks, scales, bias):
    """The reference in float32 from the (possibly bfloat16) operands, then cast to ``x``'s dtype: bfloat16 rounding
    happens once, so the tolerance below can be tight (the bfloat16 reference rounds the weight and each output)."""
    up = lambda t: None if t is None else t.float()  # noqa: E731
    return aq_linear_reference(x.float(), codes, up(codebooks), up(scales), up(bias)).to(x.dtype)


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Within float32 rounding, or, in bfloat16, 1 % of the output's largest magnitude (a wrong code or scale moves
    an output by about the output's scale)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if ref.dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    else:
        torch.testing.assert_close(out.float(), ref.float(), atol=1e-2 * float(ref.float().abs().max()), rtol=1e-2)


def test_int16_codes_above_2_15_are_stored_negative():
    codes = make_operands(config="1x16")[0]
    assert codes.dtype == torch.int16 and bool((codes < 0).any())  # the cases below exercise the low-16-bit rule


INPUT_SHAPES = {"1d": (64,), "row": (1, 64), "rows3": (3, 64), "rows9": (9, 64), "3d": (2, 5, 64),
                "prefill": (4, 11, 64)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("shape", INPUT_SHAPES.values(), ids=INPUT_SHAPES.keys())
def test_registered_cpu_path_matches_reference(shape, config, bias, dtype):
    codes, codebooks, scales, b = make_operands(config=config, dtype=dtype, bias=bias)
    x = make_input(shape, dtype)
    out = torch.ops.lowrank.aq_linear(x, codes, codebooks, scales, b)
    assert_matches(out, reference(x, codes, codebooks, scales, b))


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("kernel,rows", [(Kernel.TABLE, 1), (Kernel.CODEBOOK, 1), (Kernel.CODEBOOK, 2),
                                         (Kernel.CODEBOOK, 7), (Kernel.CODEBOOK, 16), (Kernel.DEQUANTIZE, 1),
                                         (Kernel.DEQUANTIZE, 33)])
def test_each_cpu_kernel_matches_reference(kernel, rows, config):
    """Each C++ kernel forced, at row counts that take every register-blocking branch (4 + 2 + 1 rows), and output
    counts that leave a partial block (44 = 5 blocks of 8 + 4)."""
    codes, codebooks, scales, b = make_operands(out_features=44, in_features=72, config=config)
    x = make_input((rows, 72))
    out = aq_linear_cpu.aq_linear_cpu(x, codes, codebooks, scales, b, kernel)
    assert_matches(out, aq_linear_reference(x, codes, codebooks, scales, b))


# (x, scales and bias dtype, codebooks dtype): the 16-bit storage of float32 / float16 / bfloat16 models, and a
# folder saved with float32 codebooks loaded into a bfloat16 model
MIXED = {"f32_f16": (torch.float32, torch.float16), "f32_bf16": (torch.float32, torch.bfloat16),
         "bf16_bf16": (torch.bfloat16, torch.bfloat16), "f16_f16": (torch.float16, torch.float16),
         "bf16_f32": (torch.bfloat16, torch.float32)}


@pytest.mark.parametrize("dtypes", MIXED.values(), ids=MIXED.keys())
@pytest.mark.parametrize("shape", [(64,), (1, 64), (3, 64), (2, 5, 64), (4, 11, 64)],
                         ids=["1d", "row", "rows3", "3d", "prefill"])
def test_codebooks_in_another_dtype_than_the_input_match_the_reference(shape, dtypes):
    """16-bit codebooks with a float32 (or another dtype's) input through the registered op: the output is in
    the input's dtype and matches the float32 reference (the codewords upcast exactly)."""
    dtype, books_dtype = dtypes
    codes, codebooks, scales, b = make_operands(dtype=dtype, books_dtype=books_dtype)
    x = make_input(shape, dtype)
    assert_matches(torch.ops.lowrank.aq_linear(x, codes, codebooks, scales, b), reference(x, codes, codebooks, scales, b))


@pytest.mark.parametrize("books_dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("kernel,rows", [(Kernel.TABLE, 1), (Kernel.CODEBOOK, 1), (Kernel.CODEBOOK, 7),
                                         (Kernel.DEQUANTIZE, 1), (Kernel.DEQUANTIZE, 33)])
def test_each_cpu_kernel_takes_16_bit_codebooks_with_a_float32_input(kernel, rows, config, books_dtype):
    codes, codebooks, scales, b = make_operands(out_features=44, in_features=72, config=config, books_dtype=books_dtype)
    x = make_input((rows, 72))
    out = aq_linear_cpu.aq_linear_cpu(x, codes, codebooks, scales, b, kernel)
    assert_matches(out, aq_linear_reference(x, codes, codebooks.float(), scales, b))


def test_the_reference_sums_16_bit_codewords_in_float32():
    """The reference (and ``dequantize``) upcast 16-bit codebooks before summing the M codewords: a float16 sum
    would round each group by ~5e-4 of its size."""
    codes, codebooks, scales, b = make_operands(books_dtype=torch.float16)
    weight = dequantize(codes, codebooks, scales)
    assert weight.dtype == torch.float32
    torch.testing.assert_close(weight, dequantize(codes, codebooks.float(), scales), atol=0, rtol=0)
    x = make_input((3, 64), torch.float64)  # float64 takes the reference on CPU
    torch.testing.assert_close(torch.ops.lowrank.aq_linear(x, codes, codebooks, scales.double(), b.double()),
                               aq_linear_reference(x, codes, codebooks.double(), scales.double(), b.double()))


def test_strided_and_empty_inputs():
    codes, codebooks, scales, b = make_operands()
    strided = make_input((3, 128))[:, ::2]
    assert_matches(torch.ops.lowrank.aq_linear(strided, codes, codebooks, scales, b),
                   reference(strided, codes, codebooks, scales, b))
    assert torch.ops.lowrank.aq_linear(make_input((2, 0, 64)), codes, codebooks, scales, b).shape == (2, 0, 40)


def test_other_group_sizes_and_codebook_counts_use_dequantize():
    """M > 2, g other than 8 and 4, or g = 4 with an odd number of groups are outside the vector kernels: the op
    still matches the reference (dequantise + matmul)."""
    gen = torch.Generator().manual_seed(0)
    for books, group in ((3, 8), (2, 4), (1, 6)):  # 5 groups
        codes = torch.randint(0, 16, (10, 5, books), generator=gen).to(torch.uint8)
        codebooks, scales = torch.randn(books, 16, group, generator=gen), torch.rand(10, generator=gen)
        x = make_input((2, 5 * group))
        assert_matches(torch.ops.lowrank.aq_linear(x, codes, codebooks, scales, None),
                       aq_linear_reference(x, codes, codebooks, scales, None))
        with pytest.raises(RuntimeError, match=r"vector kernels need g = 8 \(or g = 4 with in_features a multiple of 8"):
            aq_linear_cpu.aq_linear_cpu(x, codes, codebooks, scales, None, Kernel.CODEBOOK)


class _AQProgram(torch.nn.Module):
    def __init__(self):
        super().__init__()
        for name, tensor in zip(("codes", "codebooks", "scales", "bias"), make_operands()):
            self.register_buffer(name, tensor)

    def forward(self, x):
        return torch.ops.lowrank.aq_linear(x, self.codes, self.codebooks, self.scales, self.bias)


def test_an_exported_program_calling_the_op_loads_after_import_lrcompile(tmp_path):
    """``import lrcompile`` defines the lowrank:: ops a compressed model calls (as the README says): a saved
    ``torch.export`` program of a quantised model loads and runs in a fresh process."""
    x = make_input((3, 64))
    torch.export.save(torch.export.export(_AQProgram(), (x,)), tmp_path / "aq.pt2")
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch, lrcompile; program = torch.export.load(sys.argv[1] + '/aq.pt2'); "
            "torch.save(program.module()(torch.load(sys.argv[1] + '/x.pt')), sys.argv[1] + '/y.pt')")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, capture_output=True, timeout=300)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), _AQProgram()(x), rtol=0, atol=0)


def test_the_checkouts_kernels_folder_imported_as_a_top_level_package_defines_no_op_again():
    """Run from a checkout (its root on ``sys.path``), the ``kernels/`` folder is importable as a top-level
    ``kernels``, and transformers imports it while probing for the Hugging Face package of that name. Had it
    defined the ops, they would be defined again by modules of another name, and CPU calls would stop reaching
    lrcompile's C++ kernels (as they did in the test suite once ``import lrcompile`` defined the ops)."""
    code = """
import importlib, sys, torch, lrcompile
from lrcompile.kernels import aq_linear_cpu
importlib.import_module("kernels")  # as transformers' is_kernels_available() does
import transformers.integrations.hub_kernels  # and the probe itself
again = [name for name in sys.modules if name.startswith("kernels.")]
assert not again, again
calls, original = [], aq_linear_cpu.aq_linear_cpu
aq_linear_cpu.aq_linear_cpu = lambda *args: calls.append(1) or original(*args)
codes = torch.randint(0, 256, (32, 8, 2), dtype=torch.uint8)
torch.ops.lowrank.aq_linear(torch.randn(1, 64), codes, torch.randn(2, 256, 8), torch.rand(32), None)
assert calls == [1], "the op's CPU kernel is not lrcompile's"
"""
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


def test_cpu_kernels_are_registered_for_the_op(monkeypatch):
    """CPU calls of the op reach the C++ kernels (not the reference)."""
    calls = []
    original = aq_linear_cpu.aq_linear_cpu
    monkeypatch.setattr(aq_linear_cpu, "aq_linear_cpu", lambda *a, **k: calls.append(1) or original(*a, **k))
    codes, codebooks, scales, b = make_operands()
    torch.ops.lowrank.aq_linear(make_input((1, 64)), codes, codebooks, scales, b)
    assert calls == [1]
    with torch.profiler.profile() as prof:
        torch.ops.lowrank.aq_linear(make_input((1, 64)), codes, codebooks, scales, b)
    assert "lowrank_aq_cpu::aq_linear" in {e.key for e in prof.key_averages()}


def test_missing_compiler_falls_back_to_the_reference_with_a_warning(monkeypatch, caplog):
    import torch.utils.cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("no g++")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    with caplog.at_level(logging.WARNING, logger=aq_linear_cpu.__name__):
        assert aq_linear_cpu.load_kernels.__wrapped__() is False
    assert "could not build the C++ CPU kernels (RuntimeError: no g++)" in caplog.text
    monkeypatch.setattr(aq_linear_cpu, "load_kernels", lambda: False)
    codes, codebooks, scales, b = make_operands()
    x = make_input((2, 64))
    assert torch.equal(aq_linear_cpu.aq_linear_cpu(x, codes, codebooks, scales, b),
                       aq_linear_reference(x, codes, codebooks, scales, b))


def test_fake_gives_shapes_and_rejects_mismatched_inputs():
    from torch._subclasses.fake_tensor import FakeTensorMode

    codes, codebooks, scales, b = make_operands()
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (codes, codebooks, scales, b)]
        for shape in ((64,), (3, 64), (2, 5, 64)):
            out = torch.ops.lowrank.aq_linear(torch.empty(shape, dtype=torch.bfloat16), *fake)
            assert out.shape == (*shape[:-1], 40) and out.dtype == torch.bfloat16
        with pytest.raises(ValueError, match="do not agree"):
            torch.ops.lowrank.aq_linear(torch.empty(3, 63), *fake)


def test_gradcheck_float64():
    """The registered gradient (x, codebooks, scales, bias) against finite differences, float64 (the reference
    path: the C++ kernels compute in float32)."""
    gen = torch.Generator().manual_seed(0)
    for books, bits in ((2, 2), (1, 3)):
        codes = torch.randint(0, 2**bits, (5, 3, books), generator=gen).to(torch.uint8)
        leaf = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_()  # noqa: E731
        x, codebooks, bias = leaf(2, 3, 12), leaf(books, 2**bits, 4), leaf(5)
        scales = (torch.rand(5, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
        assert torch.autograd.gradcheck(lambda *a: torch.ops.lowrank.aq_linear(a[0], codes, *a[1:]),
                                        (x, codebooks, scales, bias))


def test_gradients_through_the_cpu_kernels_match_autograd_of_the_reference():
    codes, codebooks, scales, b = make_operands(config="2x8")
    leaves = [t.clone().requires_grad_() for t in (make_input((3, 64)), codebooks, scales, b)]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    weight = torch.randn(3, 40)
    (torch.ops.lowrank.aq_linear(leaves[0], codes, *leaves[1:]) * weight).sum().backward()
    x, cb, s, bias = ref_leaves
    (F.linear(x, dequantize(codes, cb, s), bias) * weight).sum().backward()
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("books_dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_codebook_gradients_come_back_in_the_codebooks_dtype(books_dtype):
    """16-bit codebooks with float32 x and scales: each gradient in its leaf's dtype, the codebooks' summed in
    float32 and rounded once (it matches autograd of the float32 reference within 16-bit rounding)."""
    codes, codebooks, scales, b = make_operands(config="2x8", books_dtype=books_dtype)
    leaves = [t.clone().requires_grad_() for t in (make_input((3, 64)), codebooks, scales, b)]
    ref_leaves = [t.detach().float().clone().requires_grad_() for t in leaves]
    weight = torch.randn(3, 40)
    (torch.ops.lowrank.aq_linear(leaves[0], codes, *leaves[1:]) * weight).sum().backward()
    x, cb, s, bias = ref_leaves
    (F.linear(x, dequantize(codes, cb, s), bias) * weight).sum().backward()
    for got, want, leaf in zip(leaves, ref_leaves, leaves):
        assert got.grad.dtype == leaf.dtype
        torch.testing.assert_close(got.grad, want.grad.to(leaf.dtype), atol=1e-4, rtol=1e-4)


def _compiled(backend: str):
    def fn(x, codes, codebooks, scales, bias):
        return torch.ops.lowrank.aq_linear(torch.relu(x), codes, codebooks, scales, bias) * 2

    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)


@pytest.mark.parametrize("books_dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("rows", [1, 20], ids=["decode", "prefill"])
def test_compiles_under_aot_eager(rows, books_dtype):
    codes, codebooks, scales, b = make_operands(books_dtype=books_dtype)
    x = make_input((rows, 64))
    out = _compiled("aot_eager")(x, codes, codebooks, scales, b)
    assert_matches(out, aq_linear_reference(torch.relu(x), codes, codebooks, scales, b) * 2)


@pytest.mark.inductor
def test_inductor_calls_the_op_as_an_extern_kernel_on_the_fast_path():
    from torch._inductor.utils import run_and_get_code

    codes, codebooks, scales, b = make_operands(books_dtype=torch.float16)  # as a float32 model stores them
    x = make_input((1, 64))
    with torch.profiler.profile() as prof:
        out, code = run_and_get_code(_compiled("inductor"), x, codes, codebooks, scales, b)
    assert_matches(out, aq_linear_reference(torch.relu(x), codes, codebooks, scales, b) * 2)
    assert "torch.ops.lowrank.aq_linear.default" in "\n".join(code)
    assert "lowrank_aq_cpu::aq_linear" in {e.key for e in prof.key_averages()}
