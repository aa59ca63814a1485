"""Architectures beyond Llama and GPT-2: tiny random Qwen2 (q/k/v biases, tied embeddings: no lm_head in the
checkpoint), Mistral and Gemma (tied, norm and embedding scaling in the forward pass). For each: the streamed
merge matches mergekit-yaml, the output loads and stays tied, the live merge is bit for bit the streamed one
(a layer-wise recipe too), and the search space finds the block layout."""

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from helpers import MergekitRun
from transformers import AutoModelForCausalLM  # noqa: E402

from evomerge.demo import model_path  # noqa: E402
from evomerge.layout import LayerLayout, layer_index
from evomerge.merge import LiveMerger, merge_to_folder  # noqa: E402
from evomerge.models import open_checkpoint  # noqa: E402
from evomerge.recipes import LayerwiseRecipe, Recipe
from evomerge.space import make_slots
from evomerge.spec import Granularity

VOCAB = 46  # the demo tokenizer's
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
ARCHS = {  # name: (config class, its settings, tied embeddings)
    "qwen2": ("Qwen2Config", dict(SMALL, num_hidden_layers=3, tie_word_embeddings=True), True),
    "mistral": ("MistralConfig", dict(SMALL, num_hidden_layers=3, sliding_window=16, tie_word_embeddings=False),
                False),
    "gemma": ("GemmaConfig", dict(SMALL, num_hidden_layers=2, num_key_value_heads=1, head_dim=8,
                                  tie_word_embeddings=True), True),
}
ARCHS = {k: v for k, v in ARCHS.items() if hasattr(transformers, v[0])}
METHODS = ["ties", "task_arithmetic", "linear"]
TOKENS = torch.tensor([[3, 4, 5, 6, 7, 8]])


def weights(path) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(str(path))
    return {n: ckpt.read(n) for n in ckpt.tensors}


def build_zoo(root: Path, arch: str, seed: int) -> dict[str, Path]:
    """A random base and three 'fine-tunes' (base + small noise on every tensor, biases and norms included),
    fp32 safetensors with the demo tokenizer."""
    config_class, settings, _ = ARCHS[arch]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**settings))
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    paths = {}
    for name in ("base", "a", "b", "c"):
        if name != "base":  # a tied head and its embedding are one tensor: either noisy copy lands in it
            model.load_state_dict({k: v + 0.02 * torch.randn_like(v) for k, v in base_state.items()})
        paths[name] = root / name
        model.save_pretrained(paths[name], safe_serialization=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(model_path("base") / f, paths[name] / f)
    return paths


@pytest.fixture(scope="module")
def zoos(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("archs")
    return {arch: build_zoo(root / arch, arch, seed) for seed, arch in enumerate(ARCHS)}


def entries(models, **params) -> list[dict]:
    return [{"model": str(m), "parameters": params} for m in models]


def recipe_for(method: str, zoo: dict[str, Path]) -> Recipe:
    """Gradients over the blocks and filters on attention (and on Qwen2's biases) so that every kind of
    tensor takes its own value."""
    base, a, b, c = (zoo[k] for k in ("base", "a", "b", "c"))
    attn = [{"filter": "k_proj.bias", "value": 0.9}, {"filter": "self_attn", "value": 0.7}, {"value": [0.2, 0.6]}]
    doc = {
        "ties": dict(base_model=str(base), models=entries([a, b, c], weight=[0.3, 1.0, 0.6], density=attn)),
        "task_arithmetic": dict(base_model=str(base), models=entries([a, b], weight=attn), parameters={"lambda": 0.8}),
        "linear": dict(models=entries([a, b, c], weight=[0.2, 0.9, 0.5])),
    }[method]
    return Recipe(merge_method=method, **doc)


def layerwise_for(zoo: dict[str, Path]) -> LayerwiseRecipe:
    """TIES on block 0 (and the outer tensors), a linear average on the other blocks."""
    base, a, b, c = (str(zoo[k]) for k in ("base", "a", "b", "c"))
    n = open_checkpoint(base).num_layers
    return LayerwiseRecipe.model_validate({"base_model": base, "outer": 0, "groups": [
        {"layers": [0, 1], "merge_method": "ties", "parameters": {"lambda": 0.9},
         "models": entries([a, b], weight=[0.4, 1.0], density=0.5)},
        {"layers": [1, n], "merge_method": "linear", "models": entries([a, b, c], weight=[1.0, 0.3])}]})


@pytest.fixture(scope="module")
def streamed(zoos, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Every (architecture, method) merged once by ``merge_to_folder``, plus the layer-wise recipe."""
    root = tmp_path_factory.mktemp("streamed")
    out = {}
    for arch, zoo in zoos.items():
        for method in METHODS:
            out[arch, method] = merge_to_folder(recipe_for(method, zoo), root / f"{arch}-{method}")
        out[arch, "layerwise"] = merge_to_folder(layerwise_for(zoo), root / f"{arch}-layerwise")
    return out


@pytest.fixture(scope="module")
def mergekit_outputs(streamed, mergekit, tmp_path_factory) -> dict[tuple[str, str], tuple[Path, MergekitRun]]:
    """mergekit-yaml on each method's config (the session's mergekit interpreter): its output folder and run."""
    root = tmp_path_factory.mktemp("mergekit")
    outputs = {}
    for key, folder in streamed.items():
        if key[1] in METHODS:
            out = root / f"{key[0]}-{key[1]}"
            outputs[key] = out, mergekit.run("mergekit-yaml", folder / "mergekit_config.yml", out)
    return outputs


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_streamed_merge_matches_mergekit(arch, method, streamed, mergekit_outputs):
    theirs_path, run = mergekit_outputs[arch, method]
    assert run.returncode == 0, run.stderr[-2000:]
    ours, theirs = weights(streamed[arch, method]), weights(theirs_path)
    assert set(ours) == set(theirs)  # a tied head is written by neither
    worst = max((ours[n] - theirs[n]).abs().max().item() for n in ours)
    assert worst <= 1e-5, f"{arch} {method}: max abs difference {worst}"


@pytest.mark.parametrize("kind", [*METHODS, "layerwise"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_output_loads_and_stays_tied(arch, kind, zoos, streamed):
    out, tied = streamed[arch, kind], ARCHS[arch][2]
    inputs, got = weights(zoos[arch]["base"]), weights(out)
    assert set(got) == set(inputs)
    assert ("lm_head.weight" in got) is not tied
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied
    assert config["architectures"] == json.loads((zoos[arch]["base"] / "config.json").read_text())["architectures"]
    model = AutoModelForCausalLM.from_pretrained(out)
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert (head.data_ptr() == embed.data_ptr()) is tied
    torch.testing.assert_close(embed.detach(), got["model.embed_tokens.weight"], rtol=0, atol=0)
    with torch.no_grad():
        logits = model(TOKENS).logits
    assert logits.shape == (1, TOKENS.shape[1], VOCAB) and torch.isfinite(logits).all()


@pytest.mark.parametrize("kind", [*METHODS, "layerwise"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_live_merge_equals_streamed_merge(arch, kind, zoos, streamed):
    zoo = zoos[arch]
    recipe = layerwise_for(zoo) if kind == "layerwise" else recipe_for(kind, zoo)
    models = [str(zoo[k]) for k in ("a", "b", "c")]
    model = AutoModelForCausalLM.from_pretrained(zoo["base"], dtype=torch.float32)
    merger = LiveMerger(model, str(zoo["base"]), models)
    merger.apply(Recipe(merge_method="linear", models=entries([zoo["c"]])))  # state left by another candidate
    merger.apply(recipe)
    out = streamed[arch, kind]
    got = weights(out)
    params = dict(model.named_parameters())
    assert set(params) == set(got)
    for name, param in params.items():
        assert torch.equal(param.detach(), got[name]), f"{arch} {kind}: {name}"
    # the merged head follows the merged embedding (tied) and the live model computes what the folder does
    assert (model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()) \
        is ARCHS[arch][2]
    loaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, loaded(TOKENS).logits)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_layer_layout(arch, zoos):
    ckpt = open_checkpoint(str(zoos[arch]["base"]))
    n = ARCHS[arch][1]["num_hidden_layers"]
    layout = LayerLayout.of(ckpt)
    assert (layout.prefix, layout.num_layers) == ("model.layers.", n)
    assert layout.block_tensors == tuple(name for name in ckpt.tensors if name.startswith("model.layers."))
    blocks = {layer_index(name) for name in ckpt.tensors}
    assert blocks == {*range(n), None}
    outer = sorted(name for name in ckpt.tensors if layer_index(name) is None)
    assert outer == (["model.embed_tokens.weight", "model.norm.weight"] if ARCHS[arch][2] else
                     ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"])
    if arch == "qwen2":
        assert {f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(n) for p in "qkv"} <= set(ckpt.tensors)
    slots = make_slots(Granularity.parse("layer"), layout, ["self_attn", "mlp"])
    assert [s.filters for s in slots] == [(f"model.layers.{i}.",) for i in range(n)]
