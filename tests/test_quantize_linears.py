"""quantize="aqlm" through the lowrank backend: AQLinear / AQLowRankLinear on the model, the graph calling
lowrank::aq_linear, the per-layer report, option errors, the CLI, and save_pretrained -> from_pretrained."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_rope_model, token_batches

import lrcompile
from lrcompile.cli import _config, build_parser
from lrcompile.errors import LowRankConfigError
from lrcompile.kernels.aq_linear import dequantize
from lrcompile.modules import AQLinear, AQLowRankLinear, LowRankLinear, compressed_modules, current_record
from lrcompile.passes.additive_quantization import relative_error
from lrcompile.types import AQSpec, LayerStatus

AQ = dict(quantize="aqlm", aq_config="2x4", aq_group_size=8, aq_tolerance=0.05)  # 16 codewords: fast on the tiny model


def _quantized(param_ratio: float, compiler: str = "aot_eager", **options) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny Llama and its dense copy; the first compressed by its lowrank-compiled forward's first call."""
    torch._dynamo.reset()
    dense, model = tiny_rope_model("llama"), tiny_rope_model("llama")
    config = lrcompile.LowRankConfig(calibration=token_batches(2), param_ratio=param_ratio, allocation="uniform",
                                     compiler=compiler, **{**AQ, **options})
    model.forward = torch.compile(model.forward, backend="lowrank", options=config)
    with torch.no_grad():
        model(token_batches(1, seed=3)[0], use_cache=False)
    return model, dense


@pytest.fixture(scope="module")
def full_rank():
    model, dense = _quantized(1.0)
    yield model, dense
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def factored():
    model, dense = _quantized(0.5, compiler="eager")
    yield model, dense
    torch._dynamo.reset()


def _layers(model: torch.nn.Module, kind: type) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, kind)}


def test_alone_every_compressible_linear_becomes_an_aq_linear_with_its_record(full_rank):
    model, _ = full_rank
    layers = _layers(model, AQLinear)
    assert len(layers) == 14 and isinstance(model.lm_head, torch.nn.Linear)  # 7 per block; lm_head excluded
    for name, module in layers.items():
        record = module.lowrank_record
        assert record.status is LayerStatus.QUANTIZED and record.quantization.spec.name == "2x4"
        assert module.codes.dtype == torch.uint8 and module.codes.shape == (module.out_features, module.in_features // 8, 2)
        # the module computes x W^T with W the dequantised codes, and its error is the recorded one
        x = torch.randn(3, module.in_features)
        torch.testing.assert_close(module(x), F.linear(x, dequantize(module.codes, module.codebooks, module.scales)))
        assert 0 < record.quantization.output_error < 0.5
        assert "weight" not in dict(module.named_parameters())


def test_bits_per_weight_counts_codes_codebooks_and_scales(full_rank):
    model, _ = full_rank
    for module in _layers(model, AQLinear).values():
        out, inp = module.out_features, module.in_features
        bits = out * (inp // 8) * 2 * 8 + 2 * 16 * 8 * 16 + out * 32  # uint8 codes, float16 codebooks, float32 scales
        assert module.codebooks.dtype == torch.float16 and module.scales.dtype == torch.float32
        assert module.lowrank_record.quantization.bits_per_weight == pytest.approx(bits / (out * inp))


def test_compiled_eager_and_dequantised_dense_forwards_agree(full_rank):
    model, dense = full_rank
    ids = token_batches(1, seed=7)[0]
    with torch.no_grad():
        compiled = model(ids, use_cache=False).logits  # recompiled: the graph calls lowrank::aq_linear
        eager = model.forward._torchdynamo_orig_callable(ids, use_cache=False).logits
        for name, module in _layers(model, AQLinear).items():
            dense.get_submodule(name).weight.copy_(module.dequantized_weight())
        reference = dense(ids, use_cache=False).logits
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    torch.testing.assert_close(eager, reference, rtol=0, atol=1e-5)


def test_after_factoring_both_factors_are_quantised_and_the_error_is_the_whole_layers(factored):
    model, dense = factored
    layers = _layers(model, AQLowRankLinear)
    assert layers and not _layers(model, LowRankLinear)
    gram_free = 0
    for name, module in layers.items():
        record = module.lowrank_record
        assert record.status is LayerStatus.FACTORED and module.rank == record.plan.rank
        assert module.down.codes.shape == (module.rank, module.in_features // 8, 2)
        assert module.up.codes.shape == (module.out_features, module.rank // 8, 2)
        assert record.quantization.bits_per_weight > 2  # codes plus codebooks and scales of both factors
        approx = module.up.dequantized_weight() @ module.down.dequantized_weight()
        weight = dense.get_submodule(name).weight.detach()
        identity_error = relative_error(approx - weight, weight, torch.eye(weight.shape[1]))
        gram_free += identity_error != pytest.approx(record.quantization.output_error)  # the Gram-weighted one
        x = torch.randn(2, module.in_features)
        torch.testing.assert_close(module(x), F.linear(x, approx), rtol=1e-4, atol=1e-5)
    assert gram_free == len(layers)


def test_factored_ranks_are_multiples_of_the_aq_group_size_too():
    """Group size 16 with the default rank_multiple 8: a rank of 72 would leave the up factor's input width
    undividable by the group; the ranks are multiples of lcm(8, 16) instead."""
    model, _ = _quantized(0.5, compiler="eager", aq_group_size=16)
    layers = _layers(model, AQLowRankLinear)
    assert layers and all(m.rank % 16 == 0 and m.up.codes.shape[1] == m.rank // 16 for m in layers.values())


def test_model_report_lists_each_aq_layer_with_bits_and_output_error(full_rank, factored):
    for model, _ in (full_rank, factored):
        report = lrcompile.model_report(model)
        quantized = [layer for layer in report.layers if layer.quantization is not None]
        assert len(quantized) == 14 and all(layer.bits_per_weight and layer.output_error for layer in quantized)
        assert report.totals()["quantized"] == 14
        assert report.bytes_after == sum(layer.factor_bytes for layer in quantized)
        markdown = report.to_markdown()
        assert "## AQLM quantisation" in markdown and f"{quantized[0].bits_per_weight:.3f}" in markdown
        assert "linears factored, 14 AQLM-quantised (factored or at full rank)" in markdown  # not "0 factored" alone
    whole = lrcompile.model_report(full_rank[0]).layers[0]  # not factored: no factoring method or reason applies
    assert (whole.status, whole.method, whole.reason) == ("aq", "aqlm", "kept at full rank, its weight AQLM codes")
    assert "factoring would not save" not in lrcompile.model_report(full_rank[0]).to_markdown()


def test_quantised_layers_save_and_load_in_a_fresh_process_with_identical_logits(full_rank, factored, tmp_path):
    ids = token_batches(1, seed=7)[0]
    expected = {}
    for tag, (model, _) in (("full", full_rank), ("factored", factored)):
        with torch.no_grad():
            expected[tag] = model.forward._torchdynamo_orig_callable(ids, use_cache=False).logits
        model.save_pretrained(tmp_path / tag)
        entries = json.loads((tmp_path / tag / "config.json").read_text())["quantization_config"]["linears"]
        assert all(entry["aq"]["bits"] == 4 for entry in entries.values() if entry["status"] != "skipped")
    run = subprocess.run([sys.executable, "-c", _LOAD, json.dumps(ids.tolist()), str(tmp_path / "full"),
                          str(tmp_path / "factored")], capture_output=True, text=True, cwd=Path(__file__).parent)
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    for tag, (model, _) in (("full", full_rank), ("factored", factored)):
        kind = "AQLinear" if tag == "full" else "AQLowRankLinear"
        assert loaded[tag]["modules"].count(kind) == 14 and loaded[tag]["codes"] == "torch.uint8"
        assert loaded[tag]["codebooks"] == ["torch.float16"]  # 16-bit storage survives the round trip
        assert loaded[tag]["errors"] == [m.lowrank_record.quantization.output_error
                                         for _, m in compressed_modules(model) if m.lowrank_record.quantization]
        assert torch.equal(torch.load(tmp_path / tag / "loaded_logits.pt"), expected[tag])


_LOAD = textwrap.dedent("""
    import json, sys
    import torch
    import lrcompile
    from transformers import AutoModelForCausalLM
    from lrcompile.modules import compressed_modules
    ids, found = torch.tensor(json.loads(sys.argv[1])), {}
    for folder in sys.argv[2:]:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            torch.save(model(ids, use_cache=False).logits, folder + "/loaded_logits.pt")
        codes = next(p.dtype for n, p in model.named_parameters() if n.endswith("codes"))
        books = sorted({str(p.dtype) for n, p in model.named_parameters() if n.endswith("codebooks")})
        found[folder.rsplit("/", 1)[1]] = {
            "modules": [type(m).__name__ for _, m in compressed_modules(model)], "codes": str(codes),
            "codebooks": books,
            "errors": [m.lowrank_record.quantization.output_error for _, m in compressed_modules(model)
                       if m.lowrank_record.quantization is not None]}
    print(json.dumps(found))
""")


@pytest.mark.parametrize("quantized", ["full_rank", "factored"])
def test_recompiling_quantised_layers_with_other_options_names_them(quantized, request):
    """AQ layers run as ``aq_linear`` calls, not linears: a compile asking for other options must still see them."""
    model, _ = request.getfixturevalue(quantized)
    torch._dynamo.reset()
    try:
        config = lrcompile.LowRankConfig(calibration=token_batches(2), param_ratio=1.0 if quantized == "full_rank" else 0.5,
                                         allocation="uniform", compiler="eager", **{**AQ, "aq_config": "1x4"})
        recompiled = torch.compile(type(model).forward.__get__(model), backend="lowrank", options=config)
        with pytest.raises(Exception, match=r"layer .model\.layers\.0\.self_attn\.q_proj. was compressed with "
                                            r"aq_config='2x4' .* this compile asks for aq_config='1x4'"):
            recompiled(token_batches(1, seed=3)[0], use_cache=False)
    finally:
        torch._dynamo.reset()


def test_a_folder_saved_with_float32_codebooks_loads_with_16_bit_codebooks(factored, tmp_path):
    """A folder written before codebooks were stored in 16 bits (float32 codebooks in model.safetensors) loads:
    the codebooks come back in their 16-bit dtype (float16 for the float32 model, bfloat16 when loaded as
    bfloat16) and the logits are the saved model's."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model, _ = factored
    ids = token_batches(1, seed=7)[0]
    with torch.no_grad():
        expected = model.forward._torchdynamo_orig_callable(ids, use_cache=False).logits
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert {t.dtype for name, t in tensors.items() if name.endswith("codebooks")} == {torch.float16}
    save_file({name: t.float() if name.endswith("codebooks") else t for name, t in tensors.items()},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    for dtype, books in ((torch.float32, torch.float16), (torch.bfloat16, torch.bfloat16)):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
        parts = [part for _, m in compressed_modules(loaded) if isinstance(m, AQLowRankLinear) for part in (m.down, m.up)]
        assert len(parts) == 28 and all(p.codebooks.dtype == books and p.scales.dtype == dtype for p in parts)
        assert all(current_record(m).dtype == dtype for _, m in compressed_modules(loaded))
        with torch.no_grad():
            logits = loaded(ids, use_cache=False).logits
        if dtype == torch.float32:
            assert torch.equal(logits, expected)
        else:
            torch.testing.assert_close(logits.float(), expected, atol=0.1 * float(expected.abs().max()), rtol=0.1)


@pytest.mark.parametrize("dtype,books", [(torch.float32, torch.float16), (torch.float16, torch.float16),
                                         (torch.bfloat16, torch.bfloat16)], ids=["f32", "f16", "bf16"])
def test_an_empty_aq_linear_holds_16_bit_codebooks_and_scales_in_the_model_dtype(dtype, books):
    """What from_pretrained builds before loading: codebooks in the 16-bit storage dtype of the model's dtype."""
    module = AQLinear(64, 32, AQSpec(2, 8, 8), True, dtype=dtype)
    assert module.codebooks.dtype == books and module.scales.dtype == dtype and module.bias.dtype == dtype


def test_a_576_wide_2x8_layer_stores_at_most_2_3_bits_a_weight():
    """AQLM 2x8 g=8 at SmolLM2's width, measured from the module's bytes: codes 2 bits, float16 codebooks
    (2 x 256 x 8) 0.198, float32 scales 0.056 (float32 codebooks would make it 2.45)."""
    from lrcompile.passes.quantize_linears import AQSettings, quantize_dense
    from lrcompile.types import CompressedLayer, LayerPlan

    weight = torch.randn(576, 576, generator=torch.Generator().manual_seed(0)) * 0.02
    record = CompressedLayer(LayerPlan("layer", 576, 576, None, "aq"), "aqlm", LayerStatus.QUANTIZED, torch.float32,
                             weight.numel() * 4)
    module = quantize_dense(weight, None, None, record, AQSettings(AQSpec(2, 8, 8), tolerance=0.5))
    measured = 8 * sum(t.untyped_storage().nbytes() for t in (module.codes, module.codebooks, module.scales)) / 576**2
    assert record.quantization.bits_per_weight == pytest.approx(measured) and measured <= 2.3
    assert measured == pytest.approx(2 + 2 * 256 * 8 * 16 / 576**2 + 32 / 576)


@pytest.mark.parametrize(("options", "message"), [
    ({"quantize": "gptq"}, r"option 'quantize'='gptq' is not one of 'aqlm'"),
    ({"quantize": "aqlm", "aq_config": "2y8"}, r"option 'aq_config'='2y8': expected 'MxB'"),
    ({"quantize": "aqlm", "aq_config": "1x17"}, r"1 <= B <= 16"),
    ({"quantize": "aqlm", "aq_group_size": 0}, r"option 'aq_group_size'=0: expected a positive integer"),
    ({"quantize": "aqlm", "aq_beam_size": 0}, r"option 'aq_beam_size'=0"),
    ({"quantize": "aqlm", "aq_tolerance": 1.5}, r"option 'aq_tolerance'=1.5: expected a fraction in \[0, 1\)"),
    ({"quantize": "aqlm", "calibration_order": "sequential"}, r"use calibration_order='independent'"),
])
def test_bad_quantisation_options_are_config_errors(options, message):
    with pytest.raises(LowRankConfigError, match=message):
        lrcompile.LowRankConfig(**options)


def test_a_group_size_not_dividing_a_layer_names_it_before_calibrating(monkeypatch):
    from lrcompile.passes.calibration_runner import CalibrationRunner

    runs = []
    monkeypatch.setattr(CalibrationRunner, "run", lambda self, *args, **kwargs: runs.append(args))
    with pytest.raises(Exception, match=r"option 'aq_group_size'=12 does not divide the input width 64 of layer "
                                        r"'model.layers.0.self_attn.q_proj'") as info:
        _quantized(1.0, aq_group_size=12)
    assert not runs
    chain = [info.value, info.value.__cause__, info.value.__context__]
    assert any(isinstance(e, LowRankConfigError) for e in chain)


def test_quantize_needs_calibration_even_at_param_ratio_one():
    config = lrcompile.LowRankConfig(param_ratio=1.0, quantize="aqlm")
    assert config.needs_calibration and config.aq_spec.name == "2x8" and config.aq_spec.group_size == 8
    assert not lrcompile.LowRankConfig(param_ratio=1.0).needs_calibration


def test_cli_options_reach_the_config():
    args = build_parser().parse_args(["compress", "model", "--calib", "c.txt", "--out", "o", "--param-ratio", "1",
                                      "--quantize", "aqlm", "--aq-config", "1x16", "--aq-group-size", "4",
                                      "--aq-beam-size", "2", "--aq-tolerance", "0.05"])
    config = _config(args, None)
    assert (config.quantize, config.aq_config, config.aq_group_size, config.aq_beam_size, config.aq_tolerance) == \
        ("aqlm", "1x16", 4, 2, 0.05)
    assert _config(build_parser().parse_args(["compress", "m", "--calib", "c", "--out", "o"]), None).quantize is None
