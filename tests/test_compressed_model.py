"""The compressed model is an ordinary model: its modules hold the outcome, every way of running it agrees, and it
saves with save_pretrained and loads with from_pretrained in a fresh process (issue 11's acceptance)."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import FAMILIES as ALL_FAMILIES
from tiny_models import first_output, left_padded_prompts, tiny_model, tiny_rope_model, token_batches
from transformers import AutoModel, AutoModelForCausalLM, MixtralConfig

import lrcompile
from lrcompile.modules import AQLinear, GroupedLowRankProjection, LowRankLinear, model_latent_attention

FAMILIES = ("llama", "qwen2")
GENERATE = dict(max_new_tokens=8, do_sample=False)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compress(family: str) -> torch.nn.Module:
    """A tiny decoder compressed at param_ratio 0.5 and kv_ratio 0.5 by its lowrank-compiled forward."""
    model = tiny_rope_model(family)
    if family == "qwen2":  # non-zero K/V biases, which the grouped projections keep
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.k_proj.bias.normal_()
                layer.self_attn.v_proj.bias.normal_()
    options = lrcompile.LowRankConfig(calibration=token_batches(4), param_ratio=0.5, kv_ratio=0.5, compiler="aot_eager",
                                      allocation="uniform", kv_allocation="uniform")
    model.forward = torch.compile(model.forward, backend="lowrank", options=options)
    with torch.no_grad():
        model(token_batches(1, seed=3)[0], use_cache=False)  # the first call compresses
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_compiled_and_exported_outputs_agree(family):
    model = _compress(family)
    ids = token_batches(1, seed=7)[0]
    eager_forward = model.forward._torchdynamo_orig_callable
    with torch.no_grad():
        compiled = model(ids, use_cache=False).logits  # recompiled over the new modules: latent attention
        eager = eager_forward(ids, use_cache=False).logits  # plain modules: two matmuls, K/V rebuilt densely
        exported = torch.export.export(model, (ids,), {"use_cache": False}).module()(ids, use_cache=False).logits
    torch.testing.assert_close(eager, compiled, rtol=0, atol=1e-4)
    torch.testing.assert_close(exported, compiled, rtol=0, atol=1e-4)


@pytest.mark.inductor
def test_exported_compressed_model_runs_under_aot_inductor(tmp_path):
    model = _compress("llama")
    ids = token_batches(1, seed=7)[0]
    with torch.no_grad():
        compiled = model(ids, use_cache=False).logits
        model.forward = model.forward._torchdynamo_orig_callable
        program = torch.export.export(model, (ids,), {"use_cache": False})
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
    with torch.no_grad():
        out = torch._inductor.aoti_load_package(package)(ids, use_cache=False)
    torch.testing.assert_close(out.logits if hasattr(out, "logits") else out[0], compiled, rtol=0, atol=1e-4)


def test_report_follows_the_dtype_the_model_is_cast_to(tmp_path):
    """``model.to(bfloat16)`` after compressing, or a float32 folder loaded in bfloat16: the report counts
    bytes and KV values at 2 bytes, not 4."""
    model = _compress("llama")
    before = lrcompile.model_report(model)
    model.save_pretrained(tmp_path / "f32")
    model.to(torch.bfloat16)
    assert all(record.dtype == torch.float32 for _, record in model_latent_attention(model))  # read, not changed
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "f32", dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    resaved = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    for after in (lrcompile.model_report(m) for m in (model, loaded, resaved)):
        assert after.bytes_before * 2 == before.bytes_before
        assert after.bytes_after * 2 == before.bytes_after
        assert [a.itemsize for a in after.attention] == [2] * len(before.attention) and before.attention[0].itemsize == 4
    resaved.half()  # a loaded model casts as the model in memory does (transformers refuses a "quantized" one)
    ids = token_batches(1, seed=7)[0]
    with torch.no_grad():
        assert resaved(ids, use_cache=False).logits.dtype == torch.float16
        assert resaved.float()(ids, use_cache=False).logits.dtype == torch.float32


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_holds_the_factors_and_no_dense_weight_of_a_compressed_layer(family):
    model = _compress(family)
    state = model.state_dict()
    factored = [name for name, m in model.named_modules() if isinstance(m, LowRankLinear)]
    grouped = [name for name, m in model.named_modules() if isinstance(m, GroupedLowRankProjection)]
    assert len(factored) == 8 and len(grouped) == 4  # q/gate/up/down and k/v per layer (lm_head is left dense)
    for name in factored + grouped:
        assert f"{name}.down" in state and f"{name}.up" in state and f"{name}.weight" not in state
    assert [name for name, _ in model_latent_attention(model)] == [f"model.layers.{i}.self_attn" for i in range(2)]
    assert isinstance(model.model.layers[0].self_attn.o_proj, torch.nn.Linear)  # stays dense, nothing duplicated
    bytes_in_state = sum(t.untyped_storage().nbytes() for t in {id(t): t for t in state.values()}.values())
    assert lrcompile.weight_bytes(model) == bytes_in_state  # measured = factor bytes + what stays dense


def test_generate_loop_stays_under_the_recompile_limit(monkeypatch):
    """Compression, prefill and decode: three graphs for 8 tokens (none per token); the next request reuses them."""
    import lrcompile.backend as backend

    compiles = []
    real = backend.compress_graph
    monkeypatch.setattr(backend, "compress_graph", lambda *a: compiles.append(1) or real(*a))
    model = tiny_rope_model("llama")
    ids, mask = left_padded_prompts([6, 4])
    options = lrcompile.LowRankConfig(calibration=token_batches(2), param_ratio=0.5, kv_ratio=0.5, compiler="aot_eager")
    lrcompile.generate(model, ids, mask, options=options, **GENERATE)
    after_first = len(compiles)
    lrcompile.generate(model, ids.flip(0), mask.flip(0), options=options, **GENERATE)
    assert after_first <= 3 and len(compiles) == after_first < torch._dynamo.config.recompile_limit


_LOAD = textwrap.dedent("""
    import json, sys
    import torch
    import lrcompile  # registers the 'lowrank' quantization method with transformers
    from transformers import AutoModelForCausalLM
    folder, ids, prompt, prompt_mask = sys.argv[1], *(torch.tensor(json.loads(a)) for a in sys.argv[2:5])

    def status(key):  # kB lines of /proc/self/status
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

    AutoModelForCausalLM.from_pretrained(folder)  # a first load imports the modeling code; the second is measured
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS, so the peak below is the load's own
    before = status("VmRSS:")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    peak = status("VmHWM:")
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    tokens = lrcompile.generate(model, prompt, prompt_mask, options=lrcompile.LowRankConfig(compiler="aot_eager"),
                                max_new_tokens=8, do_sample=False)
    torch.save(logits, folder + "/loaded_logits.pt")
    print(json.dumps({"tokens": tokens.tolist(), "load_peak_rss_growth": peak - before,
                      "weight_bytes": lrcompile.weight_bytes(model),
                      "modules": sorted({type(m).__name__ for m in model.modules()})}))
""")


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_then_from_pretrained_in_a_fresh_process(family, tmp_path):
    model = _compress(family)
    ids = token_batches(1, seed=7)[0]
    prompt, prompt_mask = left_padded_prompts([6, 4])
    eager_forward = model.forward._torchdynamo_orig_callable
    with torch.no_grad():
        logits = eager_forward(ids, use_cache=False).logits
    tokens = lrcompile.generate(model, prompt, prompt_mask, **GENERATE)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "lowrank" and len(config["attention"]) == 2
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        saved = {key: f.get_slice(key).get_shape() for key in f.keys()}
    assert "model.layers.0.self_attn.k_proj.down" in saved and "model.layers.0.self_attn.k_proj.weight" not in saved

    run = subprocess.run([sys.executable, "-c", _LOAD, str(tmp_path), json.dumps(ids.tolist()),
                          json.dumps(prompt.tolist()), json.dumps(prompt_mask.tolist())],
                         capture_output=True, text=True, cwd=Path(__file__).parent)
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    assert {"LowRankLinear", "GroupedLowRankProjection"} <= set(loaded["modules"])
    assert torch.equal(torch.load(tmp_path / "loaded_logits.pt"), logits)
    assert loaded["tokens"] == tokens.tolist()
    assert loaded["weight_bytes"] == lrcompile.weight_bytes(model)  # factor bytes + what stays dense, nothing more
    folder_bytes = (tmp_path / "model.safetensors").stat().st_size
    print(f"{family}: folder {folder_bytes:,} bytes, weights {loaded['weight_bytes']:,} bytes, peak RSS growth of "
          f"from_pretrained {loaded['load_peak_rss_growth']:,} bytes")
    # the load holds the folder's tensors once (built on the meta device, no dense weight), plus a small margin
    assert loaded["load_peak_rss_growth"] <= folder_bytes + 2**20


@pytest.mark.parametrize("quantize", [None, "aqlm"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_family_loads_back_with_from_pretrained(family, quantize, tmp_path):
    """Factored (or AQ-quantised) linears of every supported architecture reload with transformers, whose weight
    init must not reach into a compressed module (GPT-2's rescales each block's ``c_proj.weight``)."""
    model = tiny_model(family)
    aq = {} if quantize is None else {"quantize": quantize, "aq_config": "1x4", "aq_group_size": 4}
    options = lrcompile.LowRankConfig(calibration=token_batches(2), param_ratio=0.5 if quantize is None else 1.0,
                                      compiler="eager", **aq)
    ids = token_batches(1, seed=7)[0]
    with torch.no_grad():
        expected = first_output(torch.compile(model, backend="lowrank", options=options)(input_ids=ids))
    kind = LowRankLinear if quantize is None else AQLinear
    assert any(isinstance(m, kind) for m in model.modules())
    model.save_pretrained(tmp_path)
    loaded = (AutoModel if family == "bert" else AutoModelForCausalLM).from_pretrained(tmp_path).eval()
    assert sum(isinstance(m, kind) for m in loaded.modules()) == sum(isinstance(m, kind) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(first_output(loaded(input_ids=ids)), expected, rtol=0, atol=1e-5)
    skipped = {layer.name: layer.reason for layer in lrcompile.model_report(model).layers if layer.status == "skipped"}
    head = "pooler.dense" if family == "bert" else "lm_head"  # excluded by default, or tied to the embedding
    assert list(skipped) == [head] and re.fullmatch(r"excluded by pattern .*|tied to \w.*", skipped[head]), skipped
    assert {layer.name: layer.reason for layer in lrcompile.model_report(loaded).layers
            if layer.status == "skipped"} == skipped  # saved with the model


def test_model_loaded_through_another_quantizer_saves_as_compressed(tmp_path):
    """A GGUF model (SmolLM2) comes with transformers' GGUF quantizer, which cannot save; its weights are plain
    tensors once loaded, so after compression it saves, and loads back, as a lowrank-compressed model."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM
    from transformers.quantizers.base import HfQuantizer

    class NotSerializable(HfQuantizer):
        def is_serializable(self):
            return False

        @property
        def is_trainable(self):
            return False

    model = tiny_rope_model("llama")
    model.hf_quantizer = NotSerializable(SimpleNamespace(quant_method="gguf"))
    model.forward = torch.compile(model.forward, backend="lowrank", options=lrcompile.LowRankConfig(
        calibration=token_batches(2), param_ratio=0.5, compiler="eager"))
    ids = token_batches(1, seed=7)[0]
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, use_cache=False).logits, logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("exclude", ["default", "head only"])
def test_moe_model_names_its_experts_left_dense_and_loads_back(exclude, tmp_path, caplog):
    """Mixtral (transformers 5): the experts are 3-D tensors no linear reads, named in a warning as left dense; the
    routers (modules calling ``F.linear`` on their own ``[experts, hidden]`` weight) are excluded by default, and
    when included (kept dense: factoring would not save) their records load back with the right shape."""
    config = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = token_batches(1, seed=7)[0]
    options = lrcompile.LowRankConfig(calibration=token_batches(4), param_ratio=0.8, compiler="eager",
                                      dump_dir=str(tmp_path / "dump"),
                                      **({} if exclude == "default" else {"exclude": ("lm_head",)}))
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        expected = torch.compile(model, backend="lowrank", options=options)(ids).logits
    assert ("4 weight tensor(s) holding 196608 parameters (82% of the graph's) are read by ops lrcompile does not "
            "factor and stay dense" in caplog.text and "model.layers.0.mlp.experts.gate_up_proj [4, 256, 64]" in caplog.text)
    router = next(layer for layer in json.loads(next((tmp_path / "dump").glob("graph_*/report.json")).read_text())[
        "layers"] if layer["name"] == "model.layers.0.mlp.gate")
    assert (router["status"], router["reason"]) == (
        ("skipped", "excluded by pattern '*.mlp.gate' (an MoE router, by default)") if exclude == "default" else
        ("dense", "factoring would not save parameters"))
    assert lrcompile.model_report(model).totals()["factored"] > 0
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=1e-5)
