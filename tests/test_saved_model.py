"""Folders written by earlier lrcompile versions (plan.json + factors.safetensors, format versions 1 and 2) load
into a fresh dense model by swapping in its compressed modules: the same outputs without calibration, and clear
errors for every way a folder can be missing, corrupted or not match the model.

The folders under tests/data/saved_compressed were written by ``save_compressed`` of commit a40f5ef (the last
version with that writer) from the tiny models below, with the outputs that compressed model gave
(``expected.safetensors``)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import left_padded_prompts, tiny_model, tiny_rope_model, token_batches
from transformers import AutoModelForCausalLM, LlamaConfig

import lrcompile
from lrcompile import LowRankConfig, SavedPlanError, load_compressed
from lrcompile.modules import GroupedLowRankProjection, LowRankLinear, model_latent_attention
from lrcompile.runtime.saved_model import FACTORS_FILE, PLAN_FILE

DATA = Path(__file__).parent / "data" / "saved_compressed"
IDS = token_batches(1, seed=7)[0]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Dynamo reuses a graph compiled for another instance of the same class: start clean."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _expected(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "expected.safetensors")


def _compressed_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, (LowRankLinear, GroupedLowRankProjection))]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_round_trip_reproduces_logits_without_calibration(family):
    folder = DATA / f"factored_{family}"
    model = tiny_model(family)  # the dense weights the folder was compressed from
    dense_bytes = lrcompile.weight_bytes(model)
    summary = load_compressed(model, folder)
    totals = json.loads((folder / PLAN_FILE).read_text())["totals"]
    assert summary.factored == totals["factored"] == len(_compressed_modules(model)) > 0
    assert summary.layers == totals["linears"]
    expected = _expected(folder)["logits"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, expected, rtol=0, atol=1e-5)  # eager
        compiled = torch.compile(model, backend="lowrank", options=LowRankConfig(compiler="eager"))  # no calibration
        torch.testing.assert_close(compiled(input_ids=IDS).logits, expected, rtol=0, atol=1e-5)
    assert lrcompile.model_report(model).totals()["factored"] == totals["factored"]
    assert lrcompile.weight_bytes(model) < dense_bytes  # the loaded factors replaced the dense weights


def test_loaded_folder_converts_to_save_pretrained(tmp_path):
    """The conversion of an earlier folder: load_compressed, then save_pretrained; from_pretrained gives it back."""
    folder = DATA / "factored_llama"
    model = tiny_model("llama")
    load_compressed(model, folder)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "lowrank"
    assert config["linears"]["model.layers.0.self_attn.q_proj"]["status"] == "factored"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, _expected(folder)["logits"], rtol=0, atol=1e-5)


def _edit_plan(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        document = json.loads((folder / PLAN_FILE).read_text())
        edit(document)
        (folder / PLAN_FILE).write_text(json.dumps(document))

    return apply


def _edit_factors(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        tensors = load_file(folder / FACTORS_FILE)
        edit(tensors)
        save_file(tensors, folder / FACTORS_FILE)

    return apply


def _first(document: dict) -> dict:
    return document["layers"][0]


Q = "model.layers.0.self_attn.q_proj"
CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing folder": (shutil.rmtree, r"saved: no such folder"),
    "missing plan": (lambda f: (f / PLAN_FILE).unlink(), r"plan\.json: missing"),
    "missing factors": (lambda f: (f / FACTORS_FILE).unlink(), r"factors\.safetensors: missing"),
    "invalid json": (lambda f: (f / PLAN_FILE).write_text('{"format": '), r"plan\.json: invalid JSON"),
    "not an object": (lambda f: (f / PLAN_FILE).write_text("[]"), r"plan\.json: expected a JSON object, got list"),
    "wrong format": (_edit_plan(lambda d: d.update(format="other")), r"plan\.json: format 'other' is not 'lrcompile\.compressed'"),
    "wrong version": (_edit_plan(lambda d: d.update(version=99)), r"plan\.json: version 99 is not supported"),
    "no layers": (_edit_plan(lambda d: d.pop("layers")), r"plan\.json: key 'layers' must be a non-empty list"),
    "missing key": (_edit_plan(lambda d: _first(d).pop("rank")), rf"plan\.json: layer 0 \('{Q}'\) lacks key\(s\) 'rank'"),
    "wrong type": (_edit_plan(lambda d: _first(d).update(rank="8")), r"plan\.json: layer 0 .* key 'rank'='8' must be int or null"),
    "bad status": (_edit_plan(lambda d: _first(d).update(status="halved")), r"plan\.json: layer 0 .* status 'halved' is not one of"),
    "bad dtype": (_edit_plan(lambda d: _first(d).update(dtype="float33")), r"plan\.json: layer 0 .* dtype 'float33' is not a torch dtype"),
    "dense with rank": (_edit_plan(lambda d: _first(d).update(status="dense")), r"plan\.json: layer 0 .* a dense layer must have rank null"),
    "weight shape disagrees": (
        _edit_plan(lambda d: _first(d).update(weight_shape=[64, 7])),
        r"plan\.json: layer 0 .* weight_shape \[64, 7\] does not hold out_features=64, in_features=64",
    ),
    "duplicate layer": (_edit_plan(lambda d: d["layers"].append(_first(d))), rf"plan\.json: layers repeat the name\(s\) '{Q}'"),
    "layer not in model": (
        _edit_plan(lambda d: _first(d).update(parameter="model.layers.9.self_attn.q_proj.weight")),
        rf"plan\.json: layer '{Q}' \(parameter 'model\.layers\.9\.self_attn\.q_proj\.weight'\) is not in the model \(LlamaForCausalLM\)",
    ),
    "rank disagrees with factors": (
        _edit_plan(lambda d: _first(d).update(rank=_first(d)["rank"] + 8)),
        rf"factors\.safetensors: tensor '{Q}\.down' has shape \[\d+, 64\], but plan\.json says \[\d+, 64\]",
    ),
    "missing factor tensor": (
        _edit_factors(lambda t: t.pop(f"{Q}.up")),
        rf"factors\.safetensors: tensor '{Q}\.up' is missing \(layer '{Q}' is factored\)",
    ),
    "factor shape": (
        _edit_factors(lambda t: t.update({f"{Q}.down": torch.zeros(3, 64)})),
        rf"factors\.safetensors: tensor '{Q}\.down' has shape \[3, 64\], but plan\.json says",
    ),
    "factor dtype": (
        _edit_factors(lambda t: t.update({f"{Q}.up": t[f"{Q}.up"].double()})),
        rf"factors\.safetensors: tensor '{Q}\.up' is torch\.float64, but plan\.json says torch\.float32",
    ),
    "extra tensor": (
        _edit_factors(lambda t: t.update({"lm_head.down": torch.zeros(1, 1)})),
        r"factors\.safetensors: tensors 'lm_head\.down' belong to no factored layer or attention block of plan\.json",
    ),
    "corrupted factors": (
        lambda f: (f / FACTORS_FILE).write_bytes(b"\x00garbage"),
        r"factors\.safetensors: not a readable safetensors file",
    ),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupted_folder_raises_naming_the_file(tmp_path, corruption):
    folder = tmp_path / "saved"
    shutil.copytree(DATA / "factored_llama", folder)
    corrupt, message = CORRUPTIONS[corruption]
    corrupt(folder)
    model = tiny_model("llama")
    with pytest.raises(SavedPlanError, match=message):
        load_compressed(model, folder)
    assert not _compressed_modules(model)  # nothing changed by a bad folder


def test_other_architecture_shape_mismatch():
    other = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)
    )
    message = r"plan\.json: layer 'model\.layers\.0\.mlp\.gate_proj': the model's weight .* has shape \[96, 64\], the plan says \[128, 64\]"
    with pytest.raises(SavedPlanError, match=message):
        load_compressed(other, DATA / "factored_llama")


def test_dtype_mismatch():
    model = tiny_model("llama").double()
    with pytest.raises(SavedPlanError, match=r"the model's weight is torch\.float64, the plan says torch\.float32"):
        load_compressed(model, DATA / "factored_llama")


def test_load_into_already_compressed_model_is_an_error():
    model = tiny_model("llama")
    load_compressed(model, DATA / "factored_llama")
    with pytest.raises(SavedPlanError, match=r"\(LowRankLinear, compressed already\?\); load into a freshly built model"):
        load_compressed(model, DATA / "factored_llama")


# --------------------------------------------------------------------------- latent KV cache (version 2)

BLOCK = "model.layers.0.self_attn"
LATENT = DATA / "latent_llama"  # factored MLPs + latent KV cache (kv_ratio 0.5, group 1), compressed by generate


def test_latent_round_trip_generates_the_same_tokens_without_calibration(monkeypatch):
    model = tiny_rope_model("llama")  # same seed: the dense weights the saved model had
    dense_bytes = lrcompile.weight_bytes(model)
    summary = load_compressed(model, LATENT)
    assert (summary.attention, summary.latent) == (2, 6) and summary.factored > 0

    def refuse(*args, **kwargs):
        raise AssertionError("a loaded model must compile without calibration or a new K/V factoring")

    monkeypatch.setattr("lrcompile.pipeline.calibrate", refuse)
    monkeypatch.setattr("lrcompile.pipeline.build_latent_attention", refuse)
    ids, mask = left_padded_prompts([7, 4])
    tokens = lrcompile.generate(model, ids, mask, options=LowRankConfig(compiler="eager", param_ratio=1.0),
                                max_new_tokens=8, do_sample=False)  # no calibration, no kv_ratio
    assert torch.equal(tokens, _expected(LATENT)["tokens"])
    plan = json.loads((LATENT / PLAN_FILE).read_text())
    report = lrcompile.model_report(model)
    assert report.totals()["factored"] == plan["totals"]["factored"]
    assert [(a.name, a.k_rank, a.v_rank) for a in report.attention] == [
        (entry["name"], entry["k_rank"], entry["v_rank"]) for entry in plan["attention"]]
    attention = model.model.layers[0].self_attn
    assert isinstance(attention.k_proj, GroupedLowRankProjection) and isinstance(attention.v_proj, GroupedLowRankProjection)
    assert lrcompile.weight_bytes(model) < dense_bytes


def test_generate_without_options_compiles_a_cpu_model_with_eager(monkeypatch):
    """A loaded model generates with no options at all; on CPU its graphs are compiled with ``eager`` (Inductor's
    compiles of each prompt shape cost minutes on CPU, far more than decoding gains), with the saved tokens."""
    from lrcompile.runtime import generation

    model = tiny_rope_model("llama")
    load_compressed(model, LATENT)
    compilers = []
    original = generation.compile_forward
    monkeypatch.setattr(generation, "compile_forward",
                        lambda model, config: compilers.append(config.compiler) or original(model, config))
    ids, mask = left_padded_prompts([7, 4])
    tokens = lrcompile.generate(model, ids, mask, max_new_tokens=8, do_sample=False)
    assert compilers == ["eager"]
    assert torch.equal(tokens, _expected(LATENT)["tokens"])


def test_value_up_projection_is_recovered_from_the_output_projection():
    """Version 2 kept V's up-projection folded into o_weight = W_o[:, h] U^v_j (Palu Eq. 6): the load solves
    for U^v_j from the model's W_o, exactly, and refuses an o_proj the folder was not compressed from."""
    model = tiny_rope_model("llama")
    load_compressed(model, LATENT)
    folded = load_file(LATENT / FACTORS_FILE)[f"{BLOCK}.o_weight"]
    attention = model.model.layers[0].self_attn
    up = attention.v_proj.up.reshape(2, 16, 8)  # [kv_heads, head_dim, v_rank]
    w_o = attention.o_proj.weight
    rebuilt = torch.cat([w_o[:, h * 16 : (h + 1) * 16] @ up[h // 2] for h in range(4)], dim=1)
    torch.testing.assert_close(rebuilt, folded, rtol=0, atol=1e-5)
    other = tiny_rope_model("llama", seed=5)  # other weights: o_proj does not fit the folded weight
    with pytest.raises(SavedPlanError, match=r"V's up-projection cannot be recovered from this model's o_proj"):
        load_compressed(other, LATENT)
    assert not _compressed_modules(other)


def _attention(document: dict) -> dict:
    return document["attention"][0]


LATENT_CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "rank disagrees with tensors": (
        _edit_plan(lambda d: _attention(d).update(k_rank=4)),
        rf"factors\.safetensors: tensor '{BLOCK}\.k_down' has shape \[16, 64\], but plan\.json says \[8, 64\] "
        r"\(heads 4, kv_heads 2, head_dim 16, group_size 1, k_rank 4, v_rank 8, hidden 64\)",
    ),
    "heads do not divide": (
        _edit_plan(lambda d: _attention(d).update(num_heads=3)),
        rf"plan\.json: attention 0 \('{BLOCK}'\): group_size=1 must divide num_kv_heads=2, which must divide num_heads=3",
    ),
    "wrong type": (
        _edit_plan(lambda d: _attention(d).update(has_o_bias=0)),
        r"plan\.json: attention 0 .* key 'has_o_bias'=0 must be bool",
    ),
    "unknown k_parameter": (
        _edit_plan(lambda d: _attention(d).update(k_parameter="model.layers.9.self_attn.k_proj.weight")),
        r"plan\.json: attention 0 .* k_parameter 'model\.layers\.9\.self_attn\.k_proj\.weight' is not the parameter "
        r"of a 'latent_kv' layer of the plan",
    ),
    "latent layer without its block": (
        _edit_plan(lambda d: d["attention"].pop(0)),
        rf"plan\.json: layer '{BLOCK}\.k_proj' has status 'latent_kv', but no attention entry restructures its block",
    ),
    "missing tensor": (
        _edit_factors(lambda t: t.pop(f"{BLOCK}.v_down")),
        rf"factors\.safetensors: tensor '{BLOCK}\.v_down' is missing \(attention block '{BLOCK}' has a latent KV cache\)",
    ),
    "tensor dtype": (
        _edit_factors(lambda t: t.update({f"{BLOCK}.o_weight": t[f"{BLOCK}.o_weight"].half()})),
        rf"factors\.safetensors: tensor '{BLOCK}\.o_weight' is torch\.float16, but plan\.json says torch\.float32",
    ),
    "bias the plan does not have": (
        _edit_factors(lambda t: t.update({f"{BLOCK}.k_bias": torch.zeros(32)})),
        rf"factors\.safetensors: tensors '{BLOCK}\.k_bias' belong to no factored layer or attention block of plan\.json",
    ),
}


@pytest.mark.parametrize("corruption", list(LATENT_CORRUPTIONS))
def test_corrupted_attention_raises_naming_the_file(tmp_path, corruption):
    folder = tmp_path / "saved"
    shutil.copytree(LATENT, folder)
    corrupt, message = LATENT_CORRUPTIONS[corruption]
    corrupt(folder)
    model = tiny_rope_model("llama")
    with pytest.raises(SavedPlanError, match=message):
        load_compressed(model, folder)
    assert not _compressed_modules(model) and not list(model_latent_attention(model))  # nothing changed


def _as_version_1(document: dict) -> None:
    document["version"] = 1
    document.pop("attention")
    for key in ("latent", "attention"):
        document["totals"].pop(key)


def test_version_1_plan_still_loads(tmp_path):
    folder = tmp_path / "v1"
    shutil.copytree(DATA / "factored_llama", folder)
    _edit_plan(_as_version_1)(folder)
    model = tiny_model("llama")
    summary = load_compressed(model, folder)
    assert summary.factored > 0 and summary.attention == 0
    compiled = torch.compile(model, backend="lowrank", options=LowRankConfig(compiler="eager"))  # no calibration
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=IDS).logits, _expected(folder)["logits"], rtol=0, atol=1e-5)


def test_version_1_plan_with_an_attention_list_is_refused(tmp_path):
    folder = tmp_path / "v1"
    shutil.copytree(DATA / "factored_llama", folder)
    _edit_plan(lambda d: d.update(version=1))(folder)
    with pytest.raises(SavedPlanError, match=r"plan\.json: version 1 has no key 'attention'"):
        load_compressed(tiny_model("llama"), folder)


def test_latent_biases_round_trip():
    """Qwen2 has K and V biases: the loaded projections keep the model's own bias parameters."""
    folder = DATA / "latent_qwen2"  # param_ratio 1.0 (every linear planned dense), kv_ratio 0.5, svd
    model = tiny_rope_model("qwen2")
    k_bias, v_bias = model.model.layers[0].self_attn.k_proj.bias, model.model.layers[0].self_attn.v_proj.bias
    summary = load_compressed(model, folder)
    assert summary.dense == 8 and summary.attention == 2
    attention = model.model.layers[0].self_attn
    assert attention.k_proj.bias is k_bias and attention.v_proj.bias is v_bias
    ids, mask = left_padded_prompts([5, 3])
    tokens = lrcompile.generate(model, ids, mask, options=LowRankConfig(compiler="eager", param_ratio=1.0),
                                max_new_tokens=4, do_sample=False)
    assert torch.equal(tokens, _expected(folder)["tokens"])
