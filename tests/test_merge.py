"""`evomerge merge`: streamed output that loads, per-layer values checked by hand, sharding, in-place merge."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import build_tied_zoo, weights
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from evomerge.cli import main
from evomerge.merge import LiveMerger, merge_to_folder
from evomerge.recipes import Recipe


@pytest.fixture(params=["float16", "bfloat16"])
def tied_zoo(request, tmp_path_factory):
    return build_tied_zoo(tmp_path_factory.mktemp(f"tied-{request.param}"), request.param)


def write_recipe(tmp_path, doc) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_linear_gradient_and_filter_by_hand(llama_zoo, tmp_path):
    doc = {
        "merge_method": "linear",
        "models": [
            {"model": str(llama_zoo["a"]), "parameters": {"weight": [{"filter": "mlp", "value": 3.0},
                                                                     {"value": [0.0, 1.0]}]}},
            {"model": str(llama_zoo["b"]), "parameters": {"weight": 1.0}},
        ],
    }
    out = tmp_path / "out"
    assert main(["merge", write_recipe(tmp_path, doc), "--out", str(out)]) == 0
    got, a, b = weights(out), weights(llama_zoo["a"]), weights(llama_zoo["b"])
    # 3 layers: positions 0, 0.5, 1 -> weight of a 0, 0.5, 1; mlp tensors always 3; embeddings at 0
    name = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(got[name], (0.5 * a[name] + b[name]) / 1.5)
    name = "model.layers.2.self_attn.o_proj.weight"
    torch.testing.assert_close(got[name], (a[name] + b[name]) / 2)
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(got[name], (3 * a[name] + b[name]) / 4)
    torch.testing.assert_close(got["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model(torch.tensor([[3, 4, 5]])).logits.shape == (1, 3, 46)
    saved = Recipe.from_yaml(out / "evomerge_recipe.yaml")
    assert saved.merge_method == "linear" and len(saved.models) == 2
    assert (out / "mergekit_config.yml").exists() and (out / "tokenizer.json").exists()


def test_task_arithmetic_sharded_output(llama_zoo, tmp_path):
    doc = {"merge_method": "task_arithmetic", "base_model": str(llama_zoo["base"]),
           "models": [{"model": str(llama_zoo[m]), "parameters": {"weight": w}} for m, w in (("a", 0.7), ("b", 0.4))],
           "parameters": {"lambda": 0.5}, "dtype": "bfloat16"}
    out = tmp_path / "sharded"
    assert main(["merge", write_recipe(tmp_path, doc), "--out", str(out), "--shard-size", "0.00002"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and all((out / f).exists() for f in files)
    got = {}
    for f in files:
        got.update(load_file(out / f))
    base, a, b = weights(llama_zoo["base"]), weights(llama_zoo["a"]), weights(llama_zoo["b"])
    for name in base:
        expected = base[name] + 0.5 * (0.7 * (a[name] - base[name]) + 0.4 * (b[name] - base[name]))
        assert got[name].dtype == torch.bfloat16
        torch.testing.assert_close(got[name], expected.to(torch.bfloat16))
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_gpt2_layout_merges_and_loads(gpt2_zoo, tmp_path):
    doc = {"merge_method": "ties", "base_model": str(gpt2_zoo["base"]),
           "models": [{"model": str(gpt2_zoo[m]), "parameters": {"weight": 1.0, "density": [0.2, 0.9]}}
                      for m in ("a", "b")]}
    out = tmp_path / "gpt2"
    assert main(["merge", write_recipe(tmp_path, doc), "--out", str(out)]) == 0
    got, base = weights(out), weights(gpt2_zoo["base"])
    kept = {n: ((got[n] - base[n]) != 0).float().mean().item() for n in got if got[n].dim() == 2}
    # layer 0 keeps ~20% of each delta (union of two models' supports <= 40%), layer 1 up to 90%
    assert kept["transformer.h.0.attn.c_attn.weight"] < 0.45 < kept["transformer.h.1.attn.c_attn.weight"]
    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.slow
def test_console_script_runs(llama_zoo, tmp_path):
    doc = {"merge_method": "slerp", "base_model": str(llama_zoo["base"]),
           "models": [{"model": str(llama_zoo["a"])}], "parameters": {"t": [0.0, 1.0]}}
    out = tmp_path / "slerp"
    done = subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", write_recipe(tmp_path, doc),
                           "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stderr  # flushed before the quick exit
    again = subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", write_recipe(tmp_path, doc),
                            "--out", str(out)], capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.strip().startswith("error: output folder"), again.stderr
    got, base, a = weights(out), weights(llama_zoo["base"]), weights(llama_zoo["a"])
    torch.testing.assert_close(got["model.layers.0.mlp.down_proj.weight"], base["model.layers.0.mlp.down_proj.weight"])
    torch.testing.assert_close(got["model.layers.2.mlp.down_proj.weight"], a["model.layers.2.mlp.down_proj.weight"])


@pytest.mark.parametrize("method", ["ties", "dare_ties", "model_stock", "linear"])
def test_live_merge_equals_streamed_merge(llama_zoo, tmp_path, method):
    models = [str(llama_zoo[m]) for m in ("a", "b", "c")]
    recipe = Recipe(merge_method=method, base_model=str(llama_zoo["base"]), seed=7,
                    models=[{"model": m, "parameters": {"weight": [0.2, 1.0]} if method != "model_stock" else {}}
                            for m in models],
                    parameters={"density": 0.5} if "ties" in method else {})
    out = tmp_path / method
    merge_to_folder(recipe, out)
    model = AutoModelForCausalLM.from_pretrained(llama_zoo["base"])
    LiveMerger(model, str(llama_zoo["base"]), models).apply(recipe)
    streamed = weights(out)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), streamed[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_live_merge_equals_streamed_merge_with_ties(tied_zoo, tmp_path, method):
    """Where the top-k cut falls among equal magnitudes, both paths keep the same entries."""
    models = [str(tied_zoo[m]) for m in ("a", "b", "c")]
    recipe = Recipe(merge_method=method, base_model=str(tied_zoo["base"]), dtype="float32",
                    models=[{"model": m, "parameters": {"weight": 1.0, "density": [0.3, 0.8]}} for m in models])
    merge_to_folder(recipe, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tied_zoo["base"], dtype=torch.float32)
    LiveMerger(model, str(tied_zoo["base"]), models).apply(recipe)
    streamed = weights(tmp_path / "out")
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), streamed[name], rtol=0, atol=0)


def test_a_base_that_linear_does_not_read_is_not_looked_up(tmp_path, monkeypatch):
    """linear merges only its models: an uncached Hub id as base_model is neither resolved nor required."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = Recipe(merge_method="linear", base_model="someorg/not-cached-model",
                    models=[{"model": "demo:add"}, {"model": "demo:reverse"}])
    assert recipe.model_refs == ["demo:add", "demo:reverse"]
    merge_to_folder(recipe, tmp_path / "out")
    assert "not-cached" not in (tmp_path / "out" / "mergekit_config.yml").read_text()
