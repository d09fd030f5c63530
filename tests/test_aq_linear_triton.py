"""Triton kernels of ``lowrank::aq_linear`` (kernels/aq_linear_triton.py) against the reference, interpreted on CPU.

Triton decides when ``@triton.jit`` runs whether a kernel is interpreted, so
all cases run in one subprocess started with ``TRITON_INTERPRET=1`` (in-process
when this run already has it), and each case is one test here. The
interpreter's block sizes are small (16 outputs, 8 groups a step), so the
cases cover several programs, several group steps and partial tiles. Without
a GPU, a further test checks that both kernels compile for sm_90.

Run as a script, this file is the interpreter worker: it prints the cases'
results as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import traceback

import pytest
import torch

from triton_interpreter import interpreted_results, needs_cpu_compile, sm90_driver  # noqa: F401


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    rows: tuple[int, ...]  # the input's shape but its last dimension
    out: int = 40
    groups: int = 11
    books: int = 2
    bits: int = 8
    group: int = 8
    dtype: torch.dtype = torch.float32
    bias: bool = True
    books_dtype: torch.dtype | None = None  # the codebooks' (default: dtype); 16-bit, as models store them


CASES = [
    Case("decode_2x8_row", (1,)),
    Case("decode_2x8_1d_nobias", (), bias=False),
    Case("decode_1x16_int16_rows3", (3,), books=1, bits=16),
    Case("decode_2x8_bf16_3d", (2, 2), dtype=torch.bfloat16),
    Case("decode_g6_3books", (2,), books=3, bits=4, group=6, out=17),
    Case("prefill_2x8_rows20", (20,)),
    Case("prefill_1x16_bf16_3d_nobias", (3, 7), books=1, bits=16, dtype=torch.bfloat16, bias=False),
    Case("decode_2x8_f16_books_rows3", (3,), books_dtype=torch.float16),
    Case("decode_1x16_bf16_books_f32", (1,), books=1, bits=16, books_dtype=torch.bfloat16),
    Case("prefill_2x8_f16_books_rows20", (20,), books_dtype=torch.float16),
    Case("prefill_2x8_bf16_f32_books_3d", (3, 7), dtype=torch.bfloat16, books_dtype=torch.float32),
]


def make_operands(case: Case, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**case.bits, (case.out, case.groups, case.books), generator=gen)
    codes = codes.to(torch.uint8 if case.bits <= 8 else torch.int16)  # int16: codes >= 2^15 stored negative
    codebooks = torch.randn(case.books, 2**case.bits, case.group, generator=gen).to(case.books_dtype or case.dtype)
    scales = (torch.rand(case.out, generator=gen) + 0.5).to(case.dtype)
    bias = torch.randn(case.out, generator=gen).to(case.dtype) if case.bias else None
    x = torch.randn(*case.rows, case.groups * case.group, generator=gen).to(case.dtype)
    return x, codes, codebooks, scales, bias


def run_case(case: Case) -> dict:
    """Kernel vs the float32 reference on the same operands; the error relative to the output's scale."""
    from lrcompile.kernels.aq_linear import aq_linear_reference
    from lrcompile.kernels.aq_linear_triton import aq_linear_triton

    try:
        x, codes, codebooks, scales, bias = make_operands(case)
        out = aq_linear_triton(x, codes, codebooks, scales, bias)
        up = lambda t: None if t is None else t.float()  # noqa: E731
        ref = aq_linear_reference(x.float(), codes, up(codebooks), up(scales), up(bias))
        return {"shape": list(out.shape), "ref_shape": list(ref.shape), "dtype": str(out.dtype),
                "relative_error": float((out.float() - ref).abs().max() / ref.abs().max())}
    except Exception:  # noqa: BLE001 - the test reports the worker's traceback
        return {"error": traceback.format_exc()}


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    return interpreted_results(__file__, lambda: {case.name: run_case(case) for case in CASES})


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kernel_matches_reference_under_interpreter(case, interpreter_results):
    result = interpreter_results[case.name]
    assert "error" not in result, result.get("error")
    assert result["shape"] == result["ref_shape"] and result["dtype"] == str(case.dtype)
    tolerance = 1e-5 if case.dtype == torch.float32 else 1e-2  # bfloat16: the output's rounding
    assert result["relative_error"] <= tolerance, f"{case.name}: max |kernel - reference| / max |reference|"


@needs_cpu_compile
def test_kernels_compile_for_sm90(sm90_driver, monkeypatch):
    """The Triton compiler (not the permissive interpreter) accepts both kernels as the op launches them."""
    from lrcompile.kernels import aq_linear_triton as kt

    compiled = []

    class Compiler:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *a, **kw: compiled.append(self.kernel.warmup(*a, **kw, grid=(1,)))

    monkeypatch.setattr(kt, "_aq_matvec_kernel", Compiler(kt._aq_matvec_kernel))
    monkeypatch.setattr(kt, "_aq_dequantize_kernel", Compiler(kt._aq_dequantize_kernel))
    for case in (CASES[2], CASES[3], CASES[5], CASES[7], CASES[9]):  # the last two: float16 codebooks
        kt.aq_linear_triton(*make_operands(case))
    assert len(compiled) == 5 and all(".target sm_90" in k.asm["ptx"] for k in compiled)


if __name__ == "__main__":
    print(json.dumps({case.name: run_case(case) for case in CASES}))
