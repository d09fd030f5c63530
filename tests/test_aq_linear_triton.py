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

from triton_interpreter import INTERPRETER, interpreted_results, needs_cpu_compile, sm90_driver  # noqa: F401


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


def run_case(case: Case, device: str = "cpu") -> dict:
    """Kernel vs the float32 reference on the same operands; the error relative to the output's scale."""
    from lrcompile.kernels.aq_linear import aq_linear_reference
    from lrcompile.kernels.aq_linear_triton import aq_linear_triton

    try:
        x, codes, codebooks, scales, bias = (None if t is None else t.to(device) for t in make_operands(case))
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


def check_result(case: Case, result: dict) -> None:
    assert "error" not in result, result.get("error")
    assert result["shape"] == result["ref_shape"] and result["dtype"] == str(case.dtype)
    tolerance = 1e-5 if case.dtype == torch.float32 else 1e-2  # bfloat16: the output's rounding
    assert result["relative_error"] <= tolerance, f"{case.name}: max |kernel - reference| / max |reference|"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kernel_matches_reference_under_interpreter(case, interpreter_results):
    check_result(case, interpreter_results[case.name])


@needs_cpu_compile
def test_kernels_compile_for_sm90(sm90_driver, monkeypatch):
    """The Triton compiler (not the permissive interpreter) accepts both kernels as the op launches them."""
    from lrcompile.kernels import aq_linear_triton as kt

    compiled = []

    class Compiler:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                kernels = self.kernel.warmup(*args, **kwargs, grid=(1,))  # the autotuner's: one per config
                compiled.extend(kernels if isinstance(kernels, list) else [kernels])
            return launch

    monkeypatch.setattr(kt, "_aq_matvec_kernel", Compiler(kt._aq_matvec_kernel))
    monkeypatch.setattr(kt, "_aq_dequantize_kernel", Compiler(kt._aq_dequantize_kernel))
    # one row, rows 3 and 2 x 2, prefill; the last two: float16 codebooks
    for case in (CASES[0], CASES[2], CASES[3], CASES[5], CASES[7], CASES[9]):
        kt.aq_linear_triton(*make_operands(case))
    assert len(compiled) == 4 * len(kt._MATVEC_CONFIGS) + 2  # every matvec tuning config, and 2 dequantisations
    assert all(".target sm_90" in k.asm["ptx"] for k in compiled)


# --------------------------------------------------------------------------- CUDA

needs_cuda = pytest.mark.skipif(INTERPRETER or not torch.cuda.is_available(), reason="needs CUDA")
# layer shapes as models have them: every tuning config's tiles full and partial, decode and prefill
GPU_CASES = CASES + [
    Case(f"{kind}_{books}x{bits}_{str(dtype)[6:]}_{out}x{groups * 8}_rows{rows}", (rows,), out=out, groups=groups,
         books=books, bits=bits, dtype=dtype)
    for books, bits in ((2, 8), (1, 16)) for dtype in (torch.float16, torch.bfloat16)
    for out, groups in ((4096, 512), (1536, 72)) for kind, rows in (("decode", 1), ("decode", 16), ("prefill", 17))
]


@needs_cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.name)
def test_cuda_kernel_matches_reference(case):
    check_result(case, run_case(case, "cuda"))


@needs_cuda
def test_cuda_op_dispatches_to_the_triton_kernels_and_inductor_keeps_them():
    from lrcompile.kernels.aq_linear_triton import aq_linear_triton

    for case in (GPU_CASES[-1], GPU_CASES[-2]):  # prefill, decode
        operands = [None if t is None else t.cuda() for t in make_operands(case)]
        expected = aq_linear_triton(*operands)
        torch.testing.assert_close(torch.ops.lowrank.aq_linear(*operands), expected, atol=0, rtol=0)
        torch._dynamo.reset()
        compiled = torch.compile(lambda *a: torch.ops.lowrank.aq_linear(*a) * 2, backend="inductor", fullgraph=True)
        torch.testing.assert_close(compiled(*operands) / 2, expected, atol=0, rtol=0)


# --------------------------------------------------------------------------- benchmark (CPU-side logic)

def test_benchmark_bytes_match_the_operands():
    from benchmarks import aq_linear_kernel as bench

    for point in bench.points(quick=False):
        if point.rows > 4:
            continue
        x, codes, codebooks, scales, _ = bench.aq_operands(point, device="cpu")
        y_bytes = point.rows * point.out_features * bench.ITEM
        packed_codes = codes.numel() * point.bits // 8  # 1x16: int16 codes are exactly 16 bits
        assert bench.aq_bytes(point) == packed_codes + codebooks.nbytes + scales.nbytes + x.nbytes + y_bytes
        x, weight = bench.dense_operands(point, device="cpu")
        assert bench.dense_bytes(point) == weight.nbytes + x.nbytes + y_bytes
        assert bench.flops(point) == 2 * x.shape[0] * weight.numel()
        # 2 bits a weight plus codebooks: the codes are 1/8 of the bf16 weight
        assert packed_codes * 8 == weight.nbytes


def test_benchmark_report_renders(tmp_path):
    from benchmarks import aq_linear_kernel as bench
    from benchmarks.common import machine_info

    rows = [bench.summarize(p, None if p.rows == 16 else 10.0, 40.0, 4e12, 8e14) for p in bench.points(quick=True)]
    assert rows[0]["dense_over_aq"] == 4.0 and rows[1]["aq_GBps"] is None
    assert rows[0]["aq_roofline_fraction"] == pytest.approx(bench.aq_bytes(bench.points(True)[0]) / 4e12 / 10e-6)
    payload = {"machine": {**machine_info(), "gpu": "none (rendering test)", "triton": "-"}, "command": "test",
               "copy_bandwidth_Bps": 4e12, "matmul_flops": 8e14, "rows": rows, "total_wall_s": 0.0}
    bench.write_report(payload, tmp_path / "k.md")
    assert "gate/up 11008x4096" in (tmp_path / "k.md").read_text()


if __name__ == "__main__":
    print(json.dumps({case.name: run_case(case) for case in CASES}))
