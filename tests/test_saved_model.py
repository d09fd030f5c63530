"""Save and load of compressed models: an exact round trip without calibration, and clear errors
for every way a saved folder can be missing, corrupted or not match the model."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import left_padded_prompts, tiny_model, tiny_rope_model, token_batches
from transformers import AutoModelForCausalLM, LlamaConfig

import lrcompile
from lrcompile import LowRankConfig, SavedPlanError, load_compressed, save_compressed
from lrcompile.runtime.compressed_layers import model_latent_attention, model_layers
from lrcompile.runtime.saved_model import FACTORS_FILE, FORMAT, PLAN_FILE, VERSION

OPTIONS = {"param_ratio": 0.8, "compiler": "eager", "method": "asvd", "allocation": "uniform"}
IDS = token_batches(1, seed=7)[0]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Dynamo reuses a graph compiled for another instance of the same class: start clean."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@dataclass(frozen=True)
class Saved:
    family: str
    folder: Path
    state: dict[str, torch.Tensor]  # dense weights before compression (the backend releases them)
    logits: torch.Tensor  # of the model compressed with calibration
    totals: dict


def _compress_and_save(family: str, folder: Path) -> Saved:
    torch._dynamo.reset()
    model = tiny_model(family)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = torch.compile(model, backend="lowrank", options={"calibration": token_batches(2), **OPTIONS})
    with torch.no_grad():
        logits = compiled(input_ids=IDS).logits
    save_compressed(model, folder)
    torch._dynamo.reset()
    return Saved(family, folder, state, logits, lrcompile.model_report(model).totals())


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Callable[[str], Saved]:
    """Compress and save each family once per module."""
    cache: dict[str, Saved] = {}

    def get(family: str) -> Saved:
        if family not in cache:
            cache[family] = _compress_and_save(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get


def _fresh(case: Saved) -> torch.nn.Module:
    """A new model with the saved model's dense weights (another seed, so they must come from ``state``)."""
    model = tiny_model(case.family, seed=1)
    model.load_state_dict(case.state)
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_round_trip_reproduces_logits_without_calibration(saved, family):
    case = saved(family)
    model = _fresh(case)
    dense_bytes = lrcompile.weight_bytes(model)
    summary = load_compressed(model, case.folder)
    assert summary.factored == case.totals["factored"] > 0
    assert summary.layers == case.totals["linears"]

    compiled = torch.compile(model, backend="lowrank", options=LowRankConfig(**OPTIONS))  # no calibration
    with torch.no_grad():
        logits = compiled(input_ids=IDS).logits
    torch.testing.assert_close(logits, case.logits, rtol=0, atol=1e-5)
    assert lrcompile.model_report(model).totals() == case.totals
    assert lrcompile.weight_bytes(model) < dense_bytes  # the loaded factors replaced the dense weights


def test_saved_files_hold_plan_and_factors(saved):
    case = saved("gpt2")  # Conv1D weights are stored [in, out]; the plan and factors are in the linear sense
    plan = json.loads((case.folder / PLAN_FILE).read_text())
    assert plan["format"] == FORMAT and plan["version"] == VERSION
    assert plan["totals"]["factored"] == case.totals["factored"]
    layer = next(entry for entry in plan["layers"] if entry["name"] == "transformer.h.0.mlp.c_fc")
    assert layer["parameter"] == "transformer.h.0.mlp.c_fc.weight"
    assert (layer["out_features"], layer["in_features"], layer["weight_shape"]) == (256, 64, [64, 256])
    assert layer["status"] == "factored" and layer["method"] == "asvd" and layer["dtype"] == "float32"
    tensors = load_file(case.folder / FACTORS_FILE)
    rank = layer["rank"]
    assert tensors["transformer.h.0.mlp.c_fc.down"].shape == (rank, 64)
    assert tensors["transformer.h.0.mlp.c_fc.up"].shape == (256, rank)
    factored = [entry["name"] for entry in plan["layers"] if entry["status"] == "factored"]
    assert sorted(tensors) == sorted(f"{name}.{part}" for name in factored for part in ("down", "up"))


def test_save_without_compression_is_an_error(tmp_path):
    with pytest.raises(lrcompile.LowRankError, match="has no compressed layers to save"):
        save_compressed(tiny_model("llama"), tmp_path / "out")


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
def test_corrupted_folder_raises_naming_the_file(saved, tmp_path, corruption):
    case = saved("llama")
    folder = tmp_path / "saved"
    shutil.copytree(case.folder, folder)
    corrupt, message = CORRUPTIONS[corruption]
    corrupt(folder)
    model = _fresh(case)
    with pytest.raises(SavedPlanError, match=message):
        load_compressed(model, folder)
    assert not list(model_layers(model))  # nothing recorded from a bad folder


def test_other_architecture_shape_mismatch(saved):
    case = saved("llama")
    other = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)
    )
    message = r"plan\.json: layer 'model\.layers\.0\.mlp\.gate_proj': the model's weight .* has shape \[96, 64\], the plan says \[128, 64\]"
    with pytest.raises(SavedPlanError, match=message):
        load_compressed(other, case.folder)


def test_dtype_mismatch(saved):
    model = _fresh(saved("llama")).double()
    with pytest.raises(SavedPlanError, match=r"the model's weight is torch\.float64, the plan says torch\.float32"):
        load_compressed(model, saved("llama").folder)


def test_load_into_already_compressed_model_is_an_error(saved):
    case = saved("llama")
    model = _fresh(case)
    load_compressed(model, case.folder)
    compiled = torch.compile(model, backend="lowrank", options=LowRankConfig(**OPTIONS))
    with torch.no_grad():
        compiled(input_ids=IDS)
    with pytest.raises(SavedPlanError, match=r"holds no data \(its dense storage was released"):
        load_compressed(model, case.folder)


# --------------------------------------------------------------------------- latent KV cache (version 2)

BLOCK = "model.layers.0.self_attn"
LATENT_OPTIONS = dict(param_ratio=0.8, method="asvd", allocation="uniform", kv_ratio=0.5, kv_allocation="uniform",
                      compiler="eager")
GENERATE = dict(max_new_tokens=8, do_sample=False)


@dataclass(frozen=True)
class LatentSaved:
    folder: Path
    ids: torch.Tensor
    mask: torch.Tensor
    tokens: torch.Tensor  # generated by the model compressed with calibration
    totals: dict
    attention: list  # the report's attention rows


@pytest.fixture(scope="module")
def latent_saved(tmp_path_factory) -> LatentSaved:
    """A tiny Llama compressed by ``lrcompile.generate`` (factored MLPs + latent KV cache), saved once per module."""
    torch._dynamo.reset()
    model = tiny_rope_model("llama")
    ids, mask = left_padded_prompts([7, 4])
    options = LowRankConfig(**LATENT_OPTIONS, calibration=token_batches(2, seq=12))
    tokens = lrcompile.generate(model, ids, mask, options=options, **GENERATE)
    folder = tmp_path_factory.mktemp("latent")
    save_compressed(model, folder)
    report = lrcompile.model_report(model)
    torch._dynamo.reset()
    return LatentSaved(folder, ids, mask, tokens, report.totals(), report.to_json()["attention"])


def test_latent_round_trip_generates_the_same_tokens_without_calibration(latent_saved, monkeypatch):
    case = latent_saved
    model = tiny_rope_model("llama")  # same seed: the dense weights the saved model had
    dense_bytes = lrcompile.weight_bytes(model)
    summary = load_compressed(model, case.folder)
    assert (summary.attention, summary.latent) == (2, 6) and summary.factored == case.totals["factored"] > 0

    def refuse(*args, **kwargs):
        raise AssertionError("a loaded model must compile without calibration or a new K/V factoring")

    monkeypatch.setattr("lrcompile.pipeline.calibrate", refuse)
    monkeypatch.setattr("lrcompile.pipeline.build_latent_attention", refuse)
    tokens = lrcompile.generate(model, case.ids, case.mask, options=LowRankConfig(compiler="eager", param_ratio=1.0),
                                **GENERATE)  # no calibration, no kv_ratio
    assert torch.equal(tokens, case.tokens)
    report = lrcompile.model_report(model)
    assert report.totals() == case.totals and report.to_json()["attention"] == case.attention
    attention = model.model.layers[0].self_attn
    assert all(getattr(attention, p).weight.untyped_storage().nbytes() == 0 for p in ("k_proj", "v_proj", "o_proj"))
    assert lrcompile.weight_bytes(model) < dense_bytes


def test_saved_files_hold_latent_attention(latent_saved):
    plan = json.loads((latent_saved.folder / PLAN_FILE).read_text())
    assert plan["version"] == VERSION == 2 and plan["totals"]["attention"] == 2 and plan["totals"]["latent"] == 6
    entry = plan["attention"][0]
    assert entry["name"] == BLOCK and entry["k_parameter"] == f"{BLOCK}.k_proj.weight"
    assert (entry["num_heads"], entry["num_kv_heads"], entry["head_dim"], entry["group_size"]) == (4, 2, 16, 1)
    assert (entry["k_rank"], entry["v_rank"], entry["has_k_bias"], entry["has_o_bias"]) == (8, 8, False, False)
    latent = {e["name"]: e for e in plan["layers"] if e["status"] == "latent_kv"}
    assert set(latent) == {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "kvo"}
    assert latent[f"{BLOCK}.k_proj"]["rank"] is None and latent[f"{BLOCK}.k_proj"]["reason"] == f"latent attention {BLOCK}"
    tensors = load_file(latent_saved.folder / FACTORS_FILE)
    assert tensors[f"{BLOCK}.k_down"].shape == (2 * 8, 64) and tensors[f"{BLOCK}.k_up"].shape == (2, 16, 8)
    assert tensors[f"{BLOCK}.v_down"].shape == (2 * 8, 64) and tensors[f"{BLOCK}.o_weight"].shape == (64, 4 * 8)
    assert f"{BLOCK}.k_bias" not in tensors and f"{BLOCK}.o_bias" not in tensors


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
def test_corrupted_attention_raises_naming_the_file(latent_saved, tmp_path, corruption):
    folder = tmp_path / "saved"
    shutil.copytree(latent_saved.folder, folder)
    corrupt, message = LATENT_CORRUPTIONS[corruption]
    corrupt(folder)
    model = tiny_rope_model("llama")
    with pytest.raises(SavedPlanError, match=message):
        load_compressed(model, folder)
    assert not list(model_layers(model)) and not list(model_latent_attention(model))  # nothing recorded


def _as_version_1(document: dict) -> None:
    document["version"] = 1
    document.pop("attention")
    for key in ("latent", "attention"):
        document["totals"].pop(key)


def test_version_1_plan_still_loads(saved, tmp_path):
    case = saved("llama")
    folder = tmp_path / "v1"
    shutil.copytree(case.folder, folder)
    _edit_plan(_as_version_1)(folder)
    model = _fresh(case)
    summary = load_compressed(model, folder)
    assert summary.factored == case.totals["factored"] > 0 and summary.attention == 0
    compiled = torch.compile(model, backend="lowrank", options=LowRankConfig(**OPTIONS))  # no calibration
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=IDS).logits, case.logits, rtol=0, atol=1e-5)


def test_version_1_plan_with_an_attention_list_is_refused(saved, tmp_path):
    folder = tmp_path / "v1"
    shutil.copytree(saved("llama").folder, folder)
    _edit_plan(lambda d: d.update(version=1))(folder)
    with pytest.raises(SavedPlanError, match=r"plan\.json: version 1 has no key 'attention'"):
        load_compressed(_fresh(saved("llama")), folder)


def test_latent_biases_round_trip(tmp_path):
    """Qwen2 has a K bias, and V's bias folds into an output-projection bias: both are saved and loaded."""
    ids, mask = left_padded_prompts([5, 3])
    options = dict(param_ratio=1.0, method="svd", kv_ratio=0.5, kv_allocation="uniform", compiler="eager")
    model = tiny_rope_model("qwen2")
    tokens = lrcompile.generate(model, ids, mask, options=LowRankConfig(**options), max_new_tokens=4, do_sample=False)
    save_compressed(model, tmp_path)
    entry = json.loads((tmp_path / PLAN_FILE).read_text())["attention"][0]
    assert entry["has_k_bias"] and entry["has_o_bias"]
    assert {f"{BLOCK}.k_bias", f"{BLOCK}.o_bias"} <= set(load_file(tmp_path / FACTORS_FILE))
    torch._dynamo.reset()
    fresh = tiny_rope_model("qwen2")
    load_compressed(fresh, tmp_path)
    again = lrcompile.generate(fresh, ids, mask, options=LowRankConfig(compiler="eager", param_ratio=1.0),
                               max_new_tokens=4, do_sample=False)
    assert torch.equal(again, tokens)
    k_bias = dict(model_latent_attention(fresh))[f"{BLOCK}.k_proj.weight"].k_bias
    torch.testing.assert_close(k_bias, fresh.model.layers[0].self_attn.k_proj.bias, rtol=0, atol=0)
