"""Triton kernels of ``lowrank::latent_attention`` (kernels/latent_attention_triton.py) and their CUDA registration.

* Interpreter: each kernel against ``latent_attention_reference`` on CPU under
  ``TRITON_INTERPRET=1``. Triton decides when ``@triton.jit`` runs whether a
  kernel is interpreted, so all cases run in one subprocess started with the
  variable set (in-process when this run already has it), and each case is one
  test here. Every case also checks that perturbing ``k_up`` moves the
  reference by more than the tolerance, so the comparison can see K.
* CUDA path without a GPU: the kernels compile to PTX for sm_90, and
  AOTAutograd traces the op on (fake) CUDA tensors into Triton kernel nodes
  that write only their outputs (Inductor then never copies the cache).
* CUDA (skipped without a GPU): fp16/bf16 at head dims 64/128, the op's eager
  CUDA dispatch, and Inductor's output code containing the kernels.

Run as a script, this file is the interpreter worker: it prints the cases'
results as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
import traceback
import types

import pytest
import torch

from lrcompile.kernels.latent_attention import latent_attention_reference
from triton_interpreter import INTERPRETER, interpreted_results, needs_cpu_compile, sm90_driver  # noqa: F401

TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (5e-3, 5e-3), torch.bfloat16: (4e-2, 4e-2)}


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention problem. ``mask``: ``none``, ``causal`` (``is_causal``), ``pad`` (bool: left padding and,
    when several queries, bottom-right causal, as a decoder with a cache), ``additive`` (the same pattern as a
    float mask with extra biases)."""

    name: str
    length: int
    keys: int
    head_dim: int = 32
    q_heads: int = 4
    kv_heads: int = 2
    group_size: int = 1
    batch: int = 2
    k_rank: int = 12
    v_rank: int = 20
    dtype: torch.dtype = torch.float32
    bias: bool = True
    mask: str = "none"
    rope_scale: float = 1.0
    strided: bool = False
    keys_matter: bool = True  # False where only one key is visible, so K cannot change the output


def make_inputs(case: Case, device: str = "cpu", seed: int = 0) -> tuple:
    """The op's arguments for ``case`` (latents at unit scale; up-projections scaled to unit-variance keys)."""
    g = torch.Generator().manual_seed(seed)
    b, t, s, d = case.batch, case.length, case.keys, case.head_dim
    groups = case.kv_heads // case.group_size

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    query = randn(b, t, case.q_heads, d).transpose(1, 2) if case.strided else randn(b, case.q_heads, t, d)
    width_k, width_v = groups * case.k_rank, groups * case.v_rank
    k_latent = randn(b, s + 3, width_k + 5)[:, :s, :width_k] if case.strided else randn(b, s, width_k)
    v_latent = randn(b, s + 3, width_v + 5)[:, :s, :width_v] if case.strided else randn(b, s, width_v)
    k_up = randn(groups, case.group_size * d, case.k_rank) / case.k_rank**0.5
    k_bias = randn(case.kv_heads * d) * 0.5 if case.bias else None
    inv_freq = 1.0 / (1000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    pad = torch.tensor([(3 * i + 17 * (i % 2)) % s for i in range(b)])  # 0, 20, 6, ... tokens of left padding
    keep = torch.arange(s)[None, :] >= pad[:, None]
    if case.mask in ("pad", "additive"):
        positions = (torch.arange(s)[None, :] - pad[:, None]).clamp(min=0)
    else:
        positions = torch.arange(s)[None, :] + 5
    if case.strided:  # every other element of a wider tensor
        positions = torch.stack([positions, -positions], dim=-1)[..., 0]
    mask = None
    if case.mask in ("pad", "additive"):
        causal = torch.arange(s)[None, :] <= torch.arange(s - t, s)[:, None]
        allowed = keep[:, None, None, :] & causal[None, None]
        mask = allowed
        if case.mask == "additive":
            mask = torch.where(allowed, 0.3 * randn(b, 1, t, s), torch.tensor(float("-inf")))
    dtype = case.dtype
    cast = lambda x: None if x is None else x.to(device=device, dtype=dtype)  # noqa: E731
    return (cast(query), cast(k_latent), cast(v_latent), positions.to(device), cast(k_up), cast(k_bias),
            inv_freq.to(device), case.rope_scale, None if mask is None else mask.to(device=device,
            dtype=torch.bool if mask.dtype == torch.bool else dtype), d**-0.5, case.mask == "causal")


def perturbed_up(args: tuple, seed: int = 1) -> tuple:
    """``args`` with the up-projection of each group's last head nudged by 5 % of its scale."""
    args = list(args)
    k_up = args[4].clone()
    d = args[0].shape[-1]
    noise = torch.randn(k_up[:, -d:].shape, generator=torch.Generator().manual_seed(seed)).to(k_up)
    k_up[:, -d:] += 0.05 * noise * k_up.float().std().to(k_up.dtype)
    args[4] = k_up
    return tuple(args)


def excess(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Largest ``|out - ref| - (atol + rtol |ref|)``: positive means out of tolerance."""
    atol, rtol = TOLERANCE[dtype]
    return float(((out.float() - ref.float()).abs() - (atol + rtol * ref.float().abs())).max())


CASES = [
    Case("decode_fp32_d16_gs1", 1, 37, head_dim=16),
    Case("decode_fp16_d32_gs2_pad", 1, 50, group_size=2, dtype=torch.float16, mask="pad"),
    Case("decode_fp32_d64_gsall_mha", 1, 23, head_dim=64, q_heads=4, kv_heads=4, group_size=4, batch=3,
         rope_scale=0.8, bias=False),
    Case("decode_fp16_d64_gqa4_additive", 1, 70, head_dim=64, q_heads=8, kv_heads=2, mask="additive",
         dtype=torch.float16, k_rank=40, v_rank=24),
    Case("decode_fp32_causal_top_left", 1, 19, mask="causal", keys_matter=False),
    Case("decode_fp16_long_pad", 1, 300, dtype=torch.float16, mask="pad", batch=3),
    Case("decode_fp32_many_splits", 1, 250, batch=1, q_heads=2, kv_heads=1, group_size=1),
    Case("decode_fp32_rank80_strided", 1, 41, k_rank=80, v_rank=36, strided=True, mask="pad"),
    Case("prefill_fp32_d16_gs2_causal", 21, 21, head_dim=16, group_size=2, mask="causal"),
    Case("prefill_fp16_d32_gs1_pad", 19, 19, batch=3, dtype=torch.float16, mask="pad"),
    Case("prefill_fp32_d64_gsall_cache", 5, 29, head_dim=64, q_heads=6, kv_heads=2, group_size=2, mask="pad"),
    Case("prefill_fp16_rank20_nobias_full", 17, 33, k_rank=20, v_rank=12, bias=False, dtype=torch.float16),
    Case("prefill_fp32_additive_strided", 9, 26, mask="additive", strided=True, rope_scale=1.2),
    Case("prefill_fp32_rank80_gqa3", 7, 18, q_heads=6, kv_heads=2, k_rank=80, v_rank=16, batch=1, mask="causal"),
    # value ranks of several interpreter tiles (MAX_VALUE_BLOCK 16), the last one partial
    Case("decode_fp32_gsall_vrank50", 1, 40, q_heads=4, kv_heads=2, group_size=2, v_rank=50, mask="pad"),
    Case("prefill_fp16_gsall_vrank72_causal", 9, 9, q_heads=4, kv_heads=2, group_size=2, v_rank=72, batch=1,
         dtype=torch.float16, mask="causal"),
]


def run_case(case: Case) -> dict:
    """Kernel vs reference for ``case`` (needs the kernels defined under the interpreter)."""
    from lrcompile.kernels.latent_attention_triton import latent_attention_triton

    start = time.perf_counter()
    try:
        args = make_inputs(case)
        out = latent_attention_triton(*args)
        ref = latent_attention_reference(*args)
        moved = latent_attention_reference(*perturbed_up(args))
        return {"excess": excess(out, ref, case.dtype), "max_err": float((out.float() - ref.float()).abs().max()),
                "perturbed_excess": excess(moved, ref, case.dtype), "finite": bool(out.isfinite().all()),
                "seconds": time.perf_counter() - start}
    except Exception:  # noqa: BLE001 - the test reports the worker's traceback
        return {"error": traceback.format_exc()}


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    return interpreted_results(__file__, lambda: {case.name: run_case(case) for case in CASES})


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kernel_matches_reference_under_interpreter(case, interpreter_results):
    result = interpreter_results[case.name]
    assert "error" not in result, result.get("error")
    assert result["finite"]
    assert result["excess"] <= 0, f"{case.name}: max |kernel - reference| = {result['max_err']:.3g}"
    if case.keys_matter:
        assert result["perturbed_excess"] > 0, f"{case.name}: perturbing k_up stays within tolerance; the case is blind"


def test_decode_splits_fill_the_gpu_and_cover_the_keys():
    from lrcompile.kernels.latent_attention_triton import _decode_split_len

    cpu = torch.device("cpu")
    assert _decode_split_len(37, 4, cpu) == 16  # interpreter cases use several splits (and merge steps)
    for keys in (1, 63, 64, 1000, 131072):
        for programs in (1, 8, 256):
            split = _decode_split_len(keys, programs, cpu)
            splits = -(-keys // split)
            assert split % 16 == 0 and (splits - 1) * split < keys <= splits * split
            assert splits <= -(-16 // programs)


# --------------------------------------------------------------------------- CUDA path, checked without a GPU

def _recorded_launches(args: tuple, monkeypatch) -> list[tuple]:
    """``(kernel, grid, args, kwargs)`` of each launch ``latent_attention_triton(*args)`` makes, recorded, not run."""
    from lrcompile.kernels import latent_attention_triton as kt

    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *a, **kw: launches.append((self.kernel, grid, a, kw))

    monkeypatch.setattr(kt, "wrap_triton", Recorder)
    kt.latent_attention_triton(*args)
    return launches


def _stack_bytes(compiled) -> int:
    """The per-thread stack frame of a compiled kernel (register spills land there), from cuobjdump."""
    import re
    import tempfile

    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
    assert re.search(r"LOCAL:0\b", usage), usage
    return int(re.search(r"STACK:(\d+)", usage).group(1))


LLAMA3_8B_GROUP_ALL = dict(head_dim=128, q_heads=32, kv_heads=8, group_size=8, batch=1, k_rank=512, v_rank=512,
                           dtype=torch.bfloat16, mask="pad")  # kv_ratio 0.5, kv_group_size "all"
SM90_CASES = [
    Case("small_bf16_bool_mask", 1, 64, head_dim=128, q_heads=8, kv_heads=2, group_size=2, k_rank=128, v_rank=64,
         batch=1, dtype=torch.bfloat16, mask="pad"),
    Case("small_fp16_additive_mask", 1, 64, head_dim=128, q_heads=8, kv_heads=2, group_size=2, k_rank=128, v_rank=64,
         batch=1, dtype=torch.float16, mask="additive"),
    Case("llama3_8b_group_all", 1, 64, **LLAMA3_8B_GROUP_ALL),
]


@needs_cpu_compile
@pytest.mark.parametrize("case", SM90_CASES, ids=lambda c: c.name)
def test_kernels_compile_for_sm90_with_bounded_value_tiles(case, sm90_driver, monkeypatch):
    """The Triton compiler (not the permissive interpreter) accepts the launches the op makes, decode and prefill,
    at the configurations with the largest tiles, for a real GPU target (PTX, then a cubin when ptxas is bundled).
    The value latent is tiled (at most MAX_VALUE_BLOCK columns a program), so even ``kv_group_size="all"`` on a
    Llama-3-8B-like shape (value rank 512) keeps the accumulator in registers: no stack frame beyond the 32 bytes
    the attention kernels always have (with the whole rank in one tile, the largest prefill configuration spills
    into a 2 KB frame a thread)."""
    from lrcompile.kernels import latent_attention_triton as kt

    decode = make_inputs(case)
    prefill = make_inputs(dataclasses.replace(case, length=16, mask="causal" if case.mask == "pad" else case.mask))
    launches = _recorded_launches(decode, monkeypatch) + _recorded_launches(prefill, monkeypatch)
    names = [getattr(kernel, "fn", kernel).__name__ for kernel, *_ in launches]
    assert names == ["_latent_decode_split_kernel", "_latent_decode_merge_kernel", "_latent_prefill_kernel"]
    v_tiles = -(-case.v_rank // min(kt.MAX_VALUE_BLOCK, case.v_rank))
    assert [launches[0][1][2], launches[1][1][1], launches[2][1]({"BLOCK_M": 16})[2]] == [v_tiles] * 3
    compiled = []
    for kernel, _, args, kwargs in launches:
        assert kwargs["BLOCK_RV"] <= kt.MAX_VALUE_BLOCK
        if hasattr(kernel, "configs"):  # autotuned: the configuration with the largest tiles
            config = kernel.configs[-1]
            compiled.append(kernel.fn.warmup(*args, **kwargs, **config.kwargs, num_warps=config.num_warps,
                                             num_stages=config.num_stages, grid=(1,)))
        else:
            compiled.append(kernel.warmup(*args, **kwargs, grid=(1,)))
    assert all(".target sm_90" in k.asm["ptx"] for k in compiled)
    assert "mma" in compiled[0].asm["ptx"] and "mma" in compiled[2].asm["ptx"]  # tensor cores in attention
    if all("cubin" in k.asm for k in compiled):
        assert max(_stack_bytes(k) for k in compiled) <= 32


@needs_cpu_compile
def test_kernels_compile_with_float_scalars_typed_fp64_as_inductor_launches_them(sm90_driver, monkeypatch):
    """Triton's own launcher types a Python float as fp32, Inductor's generated code declares it fp64. Both must
    compile (first seen on an H200: fp64 scales made the softmax state fp64, and ``tl.dot`` refused the
    accumulator)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    case = SM90_CASES[0]
    launches = (_recorded_launches(make_inputs(case), monkeypatch)
                + _recorded_launches(make_inputs(dataclasses.replace(case, length=16, mask="causal")), monkeypatch))
    attention = [(kernel, args, kwargs) for kernel, _, args, kwargs in launches if hasattr(kernel, "configs")]
    assert len(attention) == 2  # decode split and prefill
    for kernel, args, kwargs in attention:
        config = kernel.configs[0]
        options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
        src = kernel.fn.warmup(*args, **kwargs, **config.kwargs, **options, grid=(1,)).src
        assert {src.signature[name] for name in ("qk_scale", "rope_scale")} == {"fp32"}
        as_inductor = {**src.signature, "qk_scale": "fp64", "rope_scale": "fp64"}
        compiled = triton.compile(ASTSource(src.fn, as_inductor, src.constants, src.attrs),
                                  target=GPUTarget("cuda", 90, 32), options=options)
        assert ".target sm_90" in compiled.asm["ptx"]


def test_tuning_key_separates_length_buckets_masks_causal_and_bias(monkeypatch):
    """Triton's autotuner caches a configuration per key: launches in another regime (a cache 100x longer, a causal
    prefill, keys with a bias) must not share one."""
    from lrcompile.kernels import latent_attention_triton as kt

    assert [kt.key_length_bucket(n) for n in (1, 16, 17, 33, 1000, 1024, 1025, 65536, 10**6)] == [
        16, 16, 32, 64, 1024, 1024, 2048, 65536, 65536]

    def tuning_keys(case):
        return [tuple(kwargs[name] for name in kernel.keys) for kernel, _, _, kwargs in
                _recorded_launches(make_inputs(case), monkeypatch) if hasattr(kernel, "keys")]

    decode = Case("decode", 1, 40)
    for other in (dataclasses.replace(decode, keys=4000), dataclasses.replace(decode, bias=False)):
        assert tuning_keys(other) != tuning_keys(decode)
    prefill = Case("prefill", 12, 12)
    assert tuning_keys(dataclasses.replace(prefill, mask="causal")) != tuning_keys(prefill)
    assert tuning_keys(dataclasses.replace(decode, keys=41)) == tuning_keys(decode)


def _traced_graph(case: Case, monkeypatch) -> torch.fx.GraphModule:
    """The AOTAutograd forward graph of the op on fake CUDA tensors (what Inductor would receive)."""
    from torch._functorch.aot_autograd import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(
        multi_processor_count=132))
    graphs = []
    args = make_inputs(case)
    with FakeTensorMode():
        fake = [torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="cuda") if isinstance(a, torch.Tensor)
                else a for a in args]
        aot_function(lambda *a: torch.ops.lowrank.latent_attention(*a),
                     fw_compiler=lambda gm, _: graphs.append(gm) or gm)(*fake)
    return graphs[0]


@needs_cpu_compile
@pytest.mark.parametrize("case", [CASES[1], CASES[7]], ids=["decode", "prefill"])
def test_compile_traces_cuda_calls_into_kernels_that_write_only_outputs(case, sm90_driver, monkeypatch):
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table, triton_kernel_wrapper_functional

    gm = _traced_graph(case, monkeypatch)
    calls = [n for n in gm.graph.nodes if n.target is triton_kernel_wrapper_functional]
    names = [kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__ for n in calls]
    expected = ["_latent_decode_split_kernel", "_latent_decode_merge_kernel"] if case.length == 1 else [
        "_latent_prefill_kernel"]
    assert names == expected
    cloned = {name for n in calls for name in n.kwargs["tensors_to_clone"]}
    assert cloned <= {"out_ptr", "part_acc_ptr", "part_m_ptr", "part_l_ptr"}
    assert not any(n.target is torch.ops.lowrank.latent_attention.default for n in gm.graph.nodes)


@needs_cpu_compile
@pytest.mark.parametrize("case", [CASES[1], CASES[9]], ids=["decode", "prefill"])
def test_dynamic_lengths_add_no_guard_a_later_length_breaks(case, sm90_driver, monkeypatch):
    """Dynamo + AOTAutograd trace the CUDA path (routed here for CPU tensors) with symbolic lengths; every guard
    must hold for all lengths, so a growing cache never recompiles."""
    from torch._dynamo.backends.common import aot_autograd

    from lrcompile.kernels import latent_attention_cuda

    class Traced(Exception):
        pass

    monkeypatch.setattr(latent_attention_cuda, "DEVICE", "cpu")
    traced = {}

    def capture(gm, _):
        traced["gm"], traced["env"] = gm, torch._guards.TracingContext.get().fake_mode.shape_env
        raise Traced

    args = make_inputs(case)
    query, k_latent, v_latent, positions, mask = args[0], args[1], args[2], args[3], args[8]
    for tensor, dim in ((k_latent, 1), (v_latent, 1), (positions, 1), (mask, 3)):
        torch._dynamo.mark_dynamic(tensor, dim)
    if case.length > 1:
        torch._dynamo.mark_dynamic(query, 2)
        torch._dynamo.mark_dynamic(mask, 2)
    torch._dynamo.reset()
    try:
        with pytest.raises(Exception, match="Traced"):
            torch.compile(lambda *a: torch.ops.lowrank.latent_attention(*a), backend=aot_autograd(fw_compiler=capture),
                          fullgraph=True)(*args)
    finally:
        torch._dynamo.reset()
    nodes = traced["gm"].graph.nodes
    assert any(n.op == "call_function" and "triton_kernel" in str(n.target) for n in nodes)
    assert any(isinstance(n.meta.get("val"), torch.SymInt) for n in nodes if n.op == "placeholder")  # lengths
    guards = [g.expr for g in traced["env"].guards]
    for length in [*range(2, 300), 4097, 131072]:
        broken = [g for g in guards if not bool(g.xreplace({sym: length for sym in g.free_symbols}))]
        assert not broken, f"{length} keys would recompile: {broken}"


def test_cpu_calls_stay_the_op_when_traced():
    from torch._functorch.aot_autograd import aot_function

    graphs = []
    args = make_inputs(CASES[0])
    out = aot_function(lambda *a: torch.ops.lowrank.latent_attention(*a),
                       fw_compiler=lambda gm, _: graphs.append(gm) or gm)(*args)
    assert any(n.target is torch.ops.lowrank.latent_attention.default for n in graphs[0].graph.nodes)
    torch.testing.assert_close(out, latent_attention_reference(*args))


@pytest.mark.inductor
def test_cpu_inductor_still_compiles_the_reference_decomposition():
    from torch._inductor.utils import run_and_get_code

    args = make_inputs(CASES[8])
    compiled = torch.compile(lambda *a: torch.ops.lowrank.latent_attention(*a), backend="inductor", fullgraph=True)
    out, codes = run_and_get_code(compiled, *args)
    code = "\n".join(codes)
    assert "ops.lowrank.latent_attention" not in code and "_latent_prefill_kernel" not in code
    torch.testing.assert_close(out, latent_attention_reference(*args), atol=2e-3, rtol=2e-3)


# --------------------------------------------------------------------------- CUDA

needs_cuda = pytest.mark.skipif(INTERPRETER or not torch.cuda.is_available(), reason="needs CUDA")
GPU_CASES = [
    Case(f"{kind}_{str(dtype)[6:]}_d{d}_gs{gs}", t, s, head_dim=d, q_heads=8, kv_heads=4, group_size=gs,
         k_rank=d * gs // 2, v_rank=d * gs // 4, dtype=dtype, mask=mask, batch=3)
    for dtype in (torch.float16, torch.bfloat16) for d in (64, 128) for gs in (1, 4)
    for kind, t, s, mask in (("decode", 1, 1500, "pad"), ("prefill", 300, 300, "causal"), ("chunk", 70, 700, "pad"))
]


def _reference_fp32(args: tuple) -> torch.Tensor:
    return latent_attention_reference(*[a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                        for a in args])


@needs_cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.name)
def test_cuda_kernel_matches_float32_reference(case):
    from lrcompile.kernels.latent_attention_triton import latent_attention_triton

    args = make_inputs(case, "cuda")
    out = latent_attention_triton(*args)
    ref = _reference_fp32(args)
    assert excess(out, ref, case.dtype) <= 0, f"max err {(out.float() - ref).abs().max():.3g}"


@needs_cuda
def test_cuda_op_dispatches_to_the_triton_kernels():
    from lrcompile.kernels.latent_attention_triton import latent_attention_triton

    for case in (GPU_CASES[0], GPU_CASES[1]):
        args = make_inputs(case, "cuda")
        torch.testing.assert_close(torch.ops.lowrank.latent_attention(*args), latent_attention_triton(*args),
                                   atol=0, rtol=0)


@needs_cuda
@pytest.mark.inductor
@pytest.mark.parametrize("case", [GPU_CASES[0], GPU_CASES[1]], ids=["decode", "prefill"])
def test_inductor_output_code_contains_the_kernels(case):
    from torch._inductor.utils import run_and_get_code

    args = make_inputs(case, "cuda")
    compiled = torch.compile(lambda *a: torch.ops.lowrank.latent_attention(*a) * 2, backend="inductor",
                             fullgraph=True)
    out, codes = run_and_get_code(compiled, *args)
    code = "\n".join(codes)
    kernel = "_latent_decode_split_kernel" if case.length == 1 else "_latent_prefill_kernel"
    assert kernel in code and "ops.lowrank.latent_attention" not in code
    assert excess(out / 2, _reference_fp32(args), case.dtype) <= 0


# --------------------------------------------------------------------------- benchmark (CPU-side logic)

def test_benchmark_grid_covers_the_requested_shapes():
    from benchmarks import latent_attention_kernel as bench

    shapes = bench.decode_shapes(quick=False)
    assert {s.keys for s in shapes} == {1024, 4096, 16384, 65536, 131072}
    assert {s.batch for s in shapes} == {1, 4, 16, 32} and {s.queries for s in shapes} == {1}
    assert {(s.kv_ratio, s.group_size, s.rank) for s in shapes} == {(0.5, 1, 64), (0.25, 1, 32), (0.5, 4, 256),
                                                                     (0.25, 4, 128)}
    assert all(s.queries == s.keys for s in bench.prefill_shapes(quick=False))
    assert len(bench.decode_shapes(quick=True)) < len(shapes)


@pytest.mark.parametrize("kv_ratio, group_size", [(0.5, 1), (0.25, 4)])
def test_benchmark_bytes_and_flops_match_the_tensors_and_the_flop_counter(kv_ratio, group_size):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks import latent_attention_kernel as bench

    for queries in (1, 8):
        shape = bench.Shape(batch=2, keys=64 if queries == 1 else 8, kv_ratio=kv_ratio, group_size=group_size,
                            queries=queries)
        args = bench.latent_inputs(shape, device="cpu")
        with FlopCounterMode(display=False) as flops, sdpa_kernel(SDPBackend.MATH):  # math: counted as bmm
            out = latent_attention_reference(*args)
        read = sum(a.nbytes for a in (args[0], args[1], args[2], args[3], args[4]))
        assert bench.latent_bytes(shape) == read + out.nbytes
        # the reference's K reconstruction, scores and values (a causal prefill counts the full square)
        assert bench.latent_flops(shape) == flops.get_total_flops()
        q, k, v, causal = bench.dense_inputs(shape, device="cpu")
        with FlopCounterMode(display=False) as flops, sdpa_kernel(SDPBackend.MATH):
            out = bench.run_dense((q, k, v, causal))
        assert bench.dense_bytes(shape) == q.nbytes + k.nbytes + v.nbytes + out.nbytes
        assert bench.dense_flops(shape) == flops.get_total_flops()
    dense_cache = 2 * shape.batch * shape.keys * bench.KV_HEADS * bench.HEAD_DIM * bench.ITEM
    assert shape.batch * shape.keys * shape.groups * 2 * shape.rank * bench.ITEM == kv_ratio * dense_cache


def test_benchmark_roofline_and_report_render(tmp_path):
    from benchmarks import latent_attention_kernel as bench
    from benchmarks.common import machine_info
    from benchmarks.cuda_timing import roofline_s

    bandwidth, throughput = 4e12, 8e14
    shape = bench.Shape(batch=4, keys=4096, kv_ratio=0.5, group_size=4)
    row = bench.summarize(shape, {"kernel": 20.0, "reference": None, "dense": 30.0}, bandwidth, throughput)
    assert row["kernel_GBps"] == pytest.approx(bench.latent_bytes(shape) / 20e-6 / 1e9)
    assert row["kernel_roofline_fraction"] == pytest.approx(
        roofline_s(bench.latent_bytes(shape), bench.latent_flops(shape), bandwidth, throughput) / 20e-6)
    rows = [bench.summarize(s, {"kernel": 10.0 + s.keys / 1e3, "reference": None if s.keys > 2000 else 50.0,
                                "dense": 20.0 + s.keys / 1e3}, bandwidth, throughput)
            for s in bench.decode_shapes(quick=True)]
    payload = {"machine": {**machine_info(), "gpu": "none (rendering test)", "triton": "-"}, "command": "test",
               "copy_bandwidth_Bps": bandwidth, "matmul_flops": throughput, "decode": rows, "prefill": rows[:2],
               "total_wall_s": 0.0}
    plotted = bench.plot(payload, tmp_path / "k.png")
    bench.write_report(payload, tmp_path / "k.md", plotted)
    text = (tmp_path / "k.md").read_text()
    assert "OOM" in text and "## Decode" in text and "## Prefill" in text


if __name__ == "__main__":  # the interpreter worker (see the module docstring)
    torch.set_num_threads(1)
    print(json.dumps({case.name: run_case(case) for case in CASES}))
