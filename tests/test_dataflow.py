"""Layer paths (data-flow recipes): the live form computes exactly what the exported folder computes, restore
gives the worker back for weight merges, mergekit-yaml reproduces the export from the mergekit_config.yml we
write, bad path recipes are one line before anything is written, and a trial's path exports with its card."""

import gc
import json
import shutil
import weakref
from pathlib import Path

import optuna
import pytest
import torch
import transformers
import yaml
from helpers import _family, weights
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM, Qwen2Config, Qwen2ForCausalLM

from evomerge import dataflow
from evomerge.checkpoint import Checkpoint, TensorInfo
from evomerge.cli import main
from evomerge.dataflow import LivePath, check_scalable, path_to_folder, scaled_block_tensor
from evomerge.errors import SpecError
from evomerge.merge import DTYPES, LiveMerger
from evomerge.models import open_checkpoint
from evomerge.recipes import PathRecipe, Recipe
from evomerge.refs import resolve_model_path
from evomerge.run import STUDY_NAME, RunFolder, sqlite_url

TOKENS = torch.tensor([[1, 5, 7, 9, 11, 3, 4, 8, 2]])
DEMO = ["demo:base", "demo:add", "demo:reverse"]


def steps(*items) -> list[dict]:
    return [{"model": m, "layer": layer, "scale": s} for m, layer, s in items]


def load(ref, dtype: torch.dtype) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(resolve_model_path(str(ref)), dtype=dtype).eval()


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(TOKENS).logits


def generate(model: torch.nn.Module) -> list[int]:
    out = model.generate(TOKENS, max_new_tokens=10, do_sample=False, use_cache=True, pad_token_id=0)
    return out[0].tolist()


def test_scaled_block_tensor_scales_only_output_projections():
    t = torch.tensor([1.0, -3.0, 0.1], dtype=torch.float16)
    for name in ("model.layers.0.self_attn.o_proj.weight", "model.layers.2.mlp.down_proj.weight",
                 "transformer.h.1.attn.c_proj.bias", "transformer.h.0.mlp.c_proj.weight"):
        got = scaled_block_tensor(name, t, 0.3)
        assert got.dtype == torch.float16 and torch.equal(got, (t.float() * 0.3).half())
    for name in ("model.layers.0.self_attn.q_proj.weight", "transformer.h.0.attn.c_attn.bias",
                 "model.layers.1.input_layernorm.weight"):
        assert scaled_block_tensor(name, t, 0.3) is t
    assert scaled_block_tensor("model.layers.0.self_attn.o_proj.weight", t, 1.0) is t


# ----------------------------------------------------------------------------- live = exported


def live_cases(llama_zoo, gpt2_zoo):
    """(pool, live model's base, path recipe, dtype the live model and the reloaded export run in). Each path
    repeats blocks, is longer than its models, scales some steps and takes outer from a model no step uses."""
    a, b, c, base = (str(llama_zoo[k]) for k in ("a", "b", "c", "base"))
    g_base, g_a, g_b = (str(gpt2_zoo[k]) for k in ("base", "a", "b"))
    demo_path = steps(("demo:add", 0, 1.0), ("demo:reverse", 3, 0.5), ("demo:add", 0, 1.7), ("demo:add", 1, 1.0),
                      ("demo:reverse", 1, 1.0), ("demo:add", 2, 0.8), ("demo:reverse", 3, 1.0))
    return {
        "llama float32": ([base, a, b, c], base, PathRecipe(
            path=steps((a, 0, 1.0), (b, 2, 0.6), (a, 0, 1.3), (c, 1, 1.0), (a, 2, 1.0), (b, 2, 2.5), (c, 0, 1.0)),
            outer=base), torch.float32),
        "demo float16": (DEMO, "demo:base", PathRecipe(path=demo_path, outer="demo:base"), torch.float16),
        "demo float32": (DEMO, "demo:base", PathRecipe(path=demo_path, outer="demo:base", dtype="float32"),
                         torch.float32),
        "gpt2 tied": ([g_base, g_a, g_b], g_base, PathRecipe(
            path=steps((g_a, 1, 0.7), (g_a, 1, 1.0), (g_b, 0, 1.4), (g_a, 0, 1.0), (g_b, 1, 1.0)), outer=g_base),
            torch.float32),
    }


@pytest.mark.parametrize("case", ["llama float32", "demo float16", "demo float32", "gpt2 tied"])
def test_live_path_equals_the_exported_folder(case, llama_zoo, gpt2_zoo, tmp_path):
    pool, base, recipe, dtype = live_cases(llama_zoo, gpt2_zoo)[case]
    out = path_to_folder(recipe, tmp_path / "out")
    exported = load(out, dtype)
    assert exported.config.num_hidden_layers == len(recipe.path)

    model = load(base, dtype)
    original = logits(model)
    own = dict(model.named_parameters())
    live = LivePath(model, pool)
    live.apply(recipe)
    assert not torch.equal(logits(model)[..., :5], original[..., :5])
    assert torch.equal(logits(model), logits(exported))
    assert generate(model) == generate(exported)  # KV cache indexed by path position
    if "gpt2" in case:  # the head follows outer's embeddings and stays tied to them
        assert model.lm_head.weight is model.transformer.wte.weight

    live.apply(PathRecipe(path=recipe.path[:2], outer=pool[1]))  # another path on the same worker
    live.apply(recipe)
    assert torch.equal(logits(model), logits(exported))

    live.restore()
    assert model.config.num_hidden_layers == len(model.get_submodule(open_checkpoint(base).layer_prefix[:-1]))
    assert all(p is own[n] for n, p in model.named_parameters())
    assert torch.equal(logits(model), original)
    live.restore()  # a second restore changes nothing
    assert torch.equal(logits(model), original)


@pytest.fixture(scope="module")
def qwen2_zoo(tmp_path_factory):
    """A 3-layer Qwen2 whose blocks alternate sliding-window and full attention (``layer_types``)."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=46, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=3,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    return _family(tmp_path_factory.mktemp("qwen2"), Qwen2ForCausalLM(config), ["a"], 0.02, 3)


def test_layer_types_follow_the_steps(qwen2_zoo, tmp_path):
    """Each step keeps its source block's attention type (sliding window or full), live and exported."""
    base, a = str(qwen2_zoo["base"]), str(qwen2_zoo["a"])
    recipe = PathRecipe(path=steps((a, 1, 1.0), (a, 1, 0.5), (base, 0, 1.0), (a, 2, 1.0), (a, 1, 1.0)), outer=base)
    types = ["full_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    out = path_to_folder(recipe, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["layer_types"] == types
    exported = load(out, torch.float32)
    model = load(base, torch.float32)
    original = logits(model)
    live = LivePath(model, [base, a])
    live.apply(recipe)
    assert model.config.layer_types == types
    assert torch.equal(logits(model), logits(exported))
    assert generate(model) == generate(exported)
    live.restore()
    assert model.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert torch.equal(logits(model), original)


@pytest.fixture(scope="module")
def smollm3_zoo(tmp_path_factory):
    """A 4-layer SmolLM3 whose last block has no rotary embedding (``no_rope_layers``, one entry per block)."""
    if not hasattr(transformers, "SmolLM3Config"):
        pytest.skip("this transformers has no SmolLM3")
    torch.manual_seed(0)
    config = transformers.SmolLM3Config(vocab_size=46, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, no_rope_layers=[1, 1, 1, 0],
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return _family(tmp_path_factory.mktemp("smollm3"), transformers.SmolLM3ForCausalLM(config), ["a"], 0.02, 4)


def test_every_per_layer_config_list_follows_the_steps(smollm3_zoo, tmp_path):
    """SmolLM3 reads ``no_rope_layers[position]``: each step keeps its source block's entry, live and exported,
    on a reordered path and on one longer than the model."""
    base, a = str(smollm3_zoo["base"]), str(smollm3_zoo["a"])
    model = load(base, torch.float32)
    original = logits(model)
    live = LivePath(model, [base, a])
    paths = {"reordered": steps((a, 3, 1.0), (a, 0, 1.0), (a, 1, 1.0)),
             "longer": steps((a, 3, 1.0), (base, 3, 0.5), (a, 0, 1.0), (a, 1, 1.0), (base, 2, 1.0), (a, 3, 1.0))}
    for name, path in paths.items():
        recipe = PathRecipe(path=path, outer=base)
        expected = [[1, 1, 1, 0][step.layer] for step in recipe.path]
        out = path_to_folder(recipe, tmp_path / name)
        assert json.loads((out / "config.json").read_text())["no_rope_layers"] == expected
        exported = load(out, torch.float32)
        live.apply(recipe)
        assert model.config.no_rope_layers == expected
        assert torch.equal(logits(model), logits(exported)), name
        assert generate(model) == generate(exported)
    live.restore()
    assert model.config.no_rope_layers == [1, 1, 1, 0]
    assert torch.equal(logits(model), original)


def test_exported_config_remaps_any_per_layer_list_from_each_steps_model(llama_zoo, tmp_path):
    """A list with one entry per block takes the step's source model's entry; lists that only happen to have
    that length (token ids) and other lists stay."""
    refs = {}
    for name, values in {"base": [10, 11, 12], "a": [20, 21, 22]}.items():
        refs[name] = tmp_path / name
        shutil.copytree(llama_zoo[name], refs[name])
        config = json.loads((refs[name] / "config.json").read_text())
        config.update(custom_per_layer=values, eos_token_id=[2, 3, 4])
        (refs[name] / "config.json").write_text(json.dumps(config))
    base, a = str(refs["base"]), str(refs["a"])
    out = path_to_folder(PathRecipe(path=steps((a, 2, 1.0), (base, 0, 1.0), (a, 1, 1.0), (a, 2, 1.0)), outer=base),
                         tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["custom_per_layer"] == [22, 10, 21, 22]
    assert config["eos_token_id"] == [2, 3, 4] and config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == 4


@pytest.mark.parametrize("inputs_on, reader", [("device", "read"), ("host", "view")])
def test_live_path_reads_a_models_blocks_and_outer_tensors_only_when_a_path_uses_them(llama_zoo, monkeypatch,
                                                                                      inputs_on, reader):
    """A data-flow search's base is only the outer: its blocks, and the step models' outer tensors, stay on disk;
    a block is read when a path first takes it. On the device each tensor is read once and kept; memory-mapped
    (host), a path holds its own blocks only, and the next path maps what it takes afresh."""
    base, a, b = (str(llama_zoo[k]) for k in ("base", "a", "b"))
    reads: list[tuple[str, str]] = []
    original = getattr(Checkpoint, reader)

    def spy(self, name, *args):
        reads.append((Path(self.path).name, name))
        return original(self, name, *args)

    monkeypatch.setattr(Checkpoint, reader, spy)
    model = load(base, torch.float32)
    live = LivePath(model, [base, a, b], inputs_on)
    assert live.inputs.placement == inputs_on
    assert reads == []  # headers only
    prefix = open_checkpoint(a).layer_prefix

    def blocks(*layers: int) -> set[str]:
        return {n for n in open_checkpoint(a).tensors if any(n.startswith(f"{prefix}{j}.") for j in layers)}

    live.apply(PathRecipe(path=steps((a, 2, 1.0), (a, 0, 0.5), (a, 2, 1.0)), outer=b))
    assert len(reads) == len(set(reads))  # each tensor once
    assert {n for m, n in reads if m == "a"} == blocks(0, 2)
    assert {m for m, _ in reads} == {"a", "b"} and not any(n.startswith(prefix) for m, n in reads if m == "b")
    done = len(reads)
    live.apply(PathRecipe(path=steps((a, 1, 1.0), (a, 2, 2.0)), outer=b))
    assert {n for _, n in reads[done:]} == blocks(1)  # block 2 and b's outer tensors are already there
    done = len(reads)
    live.apply(PathRecipe(path=steps((b, 1, 1.0), (a, 0, 1.0)), outer=a))
    assert {n for m, n in reads[done:] if m == "b"} == blocks(1)
    assert {n for m, n in reads[done:] if m == "a" and n.startswith(prefix)} == (set() if inputs_on == "device"
                                                                                 else blocks(0))
    assert {m for m, _ in reads[done:]} == {"a", "b"}
    if inputs_on == "host":
        assert set(live._blocks) == {(b, 1), (a, 0)} and set(live._outer) == {a}


def test_apply_drops_the_previous_path_before_building_the_next(llama_zoo, monkeypatch):
    """Peak memory: the previous path's scaled tensors are gone by the time the next path's are made."""
    base, a = str(llama_zoo["base"]), str(llama_zoo["a"])
    model = load(base, torch.float32)
    live = LivePath(model, [base, a])
    live.apply(PathRecipe(path=steps((a, 0, 0.5), (a, 1, 1.0)), outer=base))
    previous = weakref.ref(model.model.layers[0].self_attn.o_proj.weight)  # made for the first path's scale
    alive = []
    scaled = dataflow.scaled_block_tensor

    def spy(name, tensor, scale):
        gc.collect()
        alive.append(previous() is not None)
        return scaled(name, tensor, scale)

    monkeypatch.setattr(dataflow, "scaled_block_tensor", spy)
    live.apply(PathRecipe(path=steps((a, 1, 0.7)), outer=base))
    assert alive and not any(alive)


def test_weight_merges_after_restore_are_as_on_a_worker_that_never_ran_a_path(llama_zoo):
    base, a, b = (str(llama_zoo[k]) for k in ("base", "a", "b"))
    weight_recipe = Recipe(merge_method="task_arithmetic", base_model=base,
                           models=[{"model": a, "parameters": {"weight": 0.7}},
                                   {"model": b, "parameters": {"weight": [0.2, 0.9]}}])
    fresh = load(base, torch.float32)
    LiveMerger(fresh, base, [a, b]).apply(weight_recipe)
    expected = logits(fresh)

    model = load(base, torch.float32)
    merger, live = LiveMerger(model, base, [a, b]), LivePath(model, [base, a, b])
    merger.apply(weight_recipe)
    live.apply(PathRecipe(path=steps((a, 1, 0.5), (b, 0, 1.0), (a, 1, 1.0), (b, 2, 2.0)), outer=a))
    assert not torch.equal(logits(model), expected)
    live.restore()
    assert torch.equal(logits(model), expected)  # the merge written before the path is back
    merger.apply(Recipe(merge_method="linear", models=[{"model": a, "parameters": {"weight": 1.0}}]))
    merger.apply(weight_recipe)
    assert torch.equal(logits(model), expected)


def test_live_path_refuses_models_outside_the_pool_and_missing_blocks(llama_zoo):
    base, a, c = (str(llama_zoo[k]) for k in ("base", "a", "c"))
    model = load(base, torch.float32)
    live = LivePath(model, [base, a])
    original = logits(model)
    bad = {f"path[1].model {c} is not in this worker's pool": PathRecipe(path=steps((a, 0, 1), (c, 0, 1)), outer=a),
           f"outer {c} is not in this worker's pool": PathRecipe(path=steps((a, 0, 1)), outer=c),
           "path[0].layer 3 does not exist": PathRecipe(path=steps((a, 3, 1)), outer=a)}
    for expected, recipe in bad.items():
        with pytest.raises(SpecError, match=expected.replace("[", r"\[").replace("]", r"\]")) as err:
            live.apply(recipe)
        assert "\n" not in str(err.value)
        assert torch.equal(logits(model), original)  # refused before anything changed


# ----------------------------------------------------------------------------- mergekit


@pytest.mark.skipif(shutil.which("mergekit-yaml") is None, reason="mergekit is not installed")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mergekit_reproduces_the_export(arch, llama_zoo, gpt2_zoo, tmp_path, mergekit):
    zoo = {"llama": llama_zoo, "gpt2": gpt2_zoo}[arch]
    a, b, base = str(zoo["a"]), str(zoo["b"]), str(zoo["base"])
    recipe = PathRecipe(path=steps((a, 1, 0.5), (b, 0, 1.0), (a, 1, 1.0), (b, 1, 1.75), (a, 0, 1.0)), outer=base)
    ours = path_to_folder(recipe, tmp_path / "ours")
    done = mergekit.run("mergekit-yaml", ours / "mergekit_config.yml", tmp_path / "theirs")
    assert done.returncode == 0, done.stderr[-2000:]
    mine, theirs = weights(ours), weights(tmp_path / "theirs")
    assert set(mine) == set(theirs)
    worst = max((mine[n] - theirs[n]).abs().max().item() for n in mine)
    assert worst <= 1e-5, f"{arch}: max abs difference {worst}"
    config, their_config = (json.loads((f / "config.json").read_text()) for f in (ours, tmp_path / "theirs"))
    assert config["num_hidden_layers" if arch == "llama" else "n_layer"] == len(recipe.path)
    assert their_config.get("num_hidden_layers", their_config.get("n_layer")) == len(recipe.path)
    # step 0 is block 1 of `a` at half scale: output projections (GPT-2: c_proj weights and biases) only
    source = weights(a)
    prefix = open_checkpoint(a).layer_prefix
    scaled = [n for n in mine if n.startswith(f"{prefix}0.") and any(p in n for p in ("o_proj", "down_proj", "c_proj"))]
    assert scaled and (arch == "llama" or any(n.endswith("c_proj.bias") for n in scaled))
    for name in (n for n in mine if n.startswith(f"{prefix}0.")):
        src = source[name.replace(f"{prefix}0.", f"{prefix}1.", 1)]
        assert torch.equal(mine[name], (src.float() * 0.5).to(src.dtype) if name in scaled else src), name
    outside = [n for n in mine if not n.startswith(prefix)]
    assert outside and all(torch.equal(mine[n], weights(base)[n]) for n in outside)


# ----------------------------------------------------------------------------- evomerge merge


GOOD = {"path": steps(("demo:add", 0, 1.0), ("demo:reverse", 2, 0.5), ("demo:add", 0, 1.0), ("demo:base", 3, 1.0),
                      ("demo:reverse", 1, 1.0)), "outer": "demo:base"}
BAD = {
    "empty path": ({**GOOD, "path": []}, "path: List should have at least 1 item"),
    "layer missing": ({**GOOD, "path": steps(("demo:add", 0, 1.0), ("demo:reverse", 4, 1.0))},
                      "path[1].layer 4 does not exist: demo:reverse has 4 blocks (0-3)"),
    "scale zero": ({**GOOD, "path": steps(("demo:add", 0, 0.0))}, "path.0.scale: Input should be greater than 0"),
    "scale negative": ({**GOOD, "path": steps(("demo:add", 0, -1.0))}, "path.0.scale: Input should be greater"),
    "scale NaN": ({**GOOD, "path": steps(("demo:add", 0, float("nan")))}, "path.0.scale: Input should be a finite"),
    "scale above 4": ({**GOOD, "path": steps(("demo:add", 0, 4.5))}, "path.0.scale: Input should be less than or "
                                                                     "equal to 4"),
    "unknown model": ({**GOOD, "path": steps(("demo:add", 0, 1.0), ("demo:nope", 0, 1.0))},
                      "path[1].model: no demo model 'nope'"),
    "missing folder": ({**GOOD, "outer": "/no/such/model"}, "outer: model folder not found: /no/such/model"),
    "outer missing": ({"path": GOOD["path"]}, "outer: Field required"),
    "unknown key": ({**GOOD, "merge_method": "passthrough"}, "merge_method: Extra inputs are not permitted"),
}


@pytest.fixture(scope="module")
def gemma2_zoo(tmp_path_factory):
    """A 2-layer Gemma2: a norm after each block's attention and MLP output cancels any scale of them."""
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=46, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1,
                          eos_token_id=2)
    return _family(tmp_path_factory.mktemp("gemma2"), Gemma2ForCausalLM(config), ["a"], 0.02, 5)


def test_scale_is_refused_where_it_would_do_nothing(gemma2_zoo, tmp_path, capsys):
    base, a = str(gemma2_zoo["base"]), str(gemma2_zoo["a"])
    recipe, out = tmp_path / "recipe.yaml", tmp_path / "out"
    recipe.write_text(yaml.safe_dump({"path": steps((a, 1, 1.0), (base, 0, 1.0), (a, 0, 0.5)), "outer": base}))
    assert main(["merge", str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "path[2].scale 0.5: scale works only where blocks add" in err and "'gemma2'" in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["recipe.yaml"]
    recipe.write_text(yaml.safe_dump({"path": steps((a, 1, 1.0), (base, 0, 1.0), (a, 0, 1.0)), "outer": base}))
    assert main(["merge", str(recipe), "--out", str(out)]) == 0
    assert torch.isfinite(logits(load(out, torch.float32))).all()


def test_check_scalable_wants_a_listed_model_type_with_output_projections(llama_zoo, gpt2_zoo):
    check_scalable(open_checkpoint(str(llama_zoo["a"])), "x")
    check_scalable(open_checkpoint(str(gpt2_zoo["a"])), "x")
    info = TensorInfo((2, 2), torch.float32, Path("m"), 0)
    renamed = Checkpoint(Path("m"), {"model_type": "llama"}, {"model.layers.0.mlp.w2.weight": info})
    with pytest.raises(SpecError, match=r"^where: m has no block tensors named o_proj, down_proj, c_proj"):
        check_scalable(renamed, "where")
    for config in ({"model_type": "mixtral"}, {}):
        with pytest.raises(SpecError, match=r"^where: scale works only .*; m is"):
            check_scalable(Checkpoint(Path("m"), config, {"model.layers.0.mlp.down_proj.weight": info}), "where")


@pytest.mark.parametrize("case", list(BAD))
def test_bad_path_recipe_is_one_line_and_writes_nothing(case, tmp_path, capsys):
    doc, expected = BAD[case]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    assert main(["merge", str(recipe), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert expected in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["recipe.yaml"]


def test_merge_command_writes_a_path_folder_that_loads(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(GOOD))
    out = tmp_path / "out"
    assert main(["merge", str(recipe), "--out", str(out)]) == 0
    assert {"model.safetensors", "config.json", "evomerge_recipe.yaml", "mergekit_config.yml",
            "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert PathRecipe.model_validate(yaml.safe_load((out / "evomerge_recipe.yaml").read_text())) == \
        PathRecipe.model_validate(GOOD)
    model = load(out, torch.float16)
    assert model.config.num_hidden_layers == 5 and len(model.model.layers) == 5
    assert torch.isfinite(logits(model)).all()
    assert main(["merge", str(recipe), "--out", str(out)]) == 2  # exists: no --force
    assert main(["merge", str(recipe), "--out", str(out), "--force"]) == 0
    assert main(["merge", str(recipe), "--out", str(resolve_model_path("demo:add") / "inside")]) == 2


# ----------------------------------------------------------------------------- export of a trial


SPEC = {"base_model": "demo:base", "models": ["demo:add", "demo:reverse"], "device": "cpu",
        "evaluation": {"include_paths": ["demo"], "tasks": [{"name": "demo_add"}]}}


def test_export_of_a_path_trial_uses_the_path_writer_and_describes_the_path(tmp_path):
    recipe = PathRecipe.model_validate(GOOD)
    run = tmp_path / "run"
    run.mkdir()
    RunFolder(run).write_doc(SPEC, "digest", 3, None, STUDY_NAME)
    study = optuna.create_study(study_name=STUDY_NAME, storage=sqlite_url(run / "study.db"), direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={
        "recipe": recipe.model_dump(mode="json", exclude_defaults=True), "scores": {"demo_add": 0.5},
        "fidelity": "full"}))
    out = tmp_path / "merged"
    assert main(["export", str(run), "--trial", "0", "--out", str(out)]) == 0
    assert weights(out).keys() == weights(path_to_folder(recipe, tmp_path / "direct")).keys()
    assert all(torch.equal(t, weights(tmp_path / "direct")[n]) for n, t in weights(out).items())
    card = (out / "README.md").read_text()
    assert "Layer path (5 blocks; embeddings, final norm and head from demo:base):" in card
    assert ("| 0 | demo:add | 0 | 1 |\n| 1 | demo:reverse | 2 | 0.5 |\n| 2 | demo:add | 0 | 1 |\n"
            "| 3 | demo:base | 3 | 1 |\n| 4 | demo:reverse | 1 | 1 |\n") in card
    assert "`mergekit_config.yml` reproduces this merge with mergekit: `mergekit-yaml" in card
    assert load(out, DTYPES["float16"]).config.num_hidden_layers == 5
    assert main(["export", str(run), "--trial", "0", "--out", str(run / "inside"), "--force"]) == 2
