"""The exported model card (README.md) starts with the Hugging Face metadata header the Hub renders: the
recipe's Hub models as ``base_model`` (the Hub links repository ids only), ``library_name: transformers``,
the merge tags; the recipe, scores and mergekit line follow. Read back with yaml and with huggingface_hub: a
search's exported winner end to end, and the card of single-method and layer-wise recipes whose models are
written in every form a recipe takes."""

import re

import pytest
import yaml
from huggingface_hub import ModelCard

from evomerge.cli import main
from evomerge.export import model_card
from evomerge.layout import LayerLayout
from evomerge.recipes import LayerwiseRecipe, parse_recipe, recipe_from_yaml

SPLITS = {"search": "search[0:12]", "validation": "validation[0:8]", "test": "test[0:8]"}
EVALUATION = {"include_paths": ["demo"], "search_examples": None, "screen_examples": None, "top_k": 1,
              "tasks": [{"name": "demo_add", "splits": SPLITS}, {"name": "demo_reverse", "splits": SPLITS}]}
SINGLE = {"base_model": "demo:base", "models": ["demo:add", "demo:reverse"],
          "space": {"methods": ["linear"], "granularity": "global"},
          "evaluation": EVALUATION, "sampler": "random", "seed": 0, "device": "cpu"}


def front_matter(text: str) -> tuple[dict, str]:
    """The YAML between the leading ``---`` lines, and the Markdown after it."""
    match = re.match(r"\A---\n(.*?)\n---\n(.*)\Z", text, re.S)
    assert match, text[:200]
    return yaml.safe_load(match.group(1)), match.group(2)


def check_card(path, hub_models: list[str] | None) -> str:
    """The card's header names ``hub_models`` (no base_model key when None), as yaml and as huggingface_hub read
    it; its body is returned."""
    text = path.read_text()
    meta, body = front_matter(text)
    assert meta.get("base_model") == hub_models
    assert meta["library_name"] == "transformers"
    assert {"merge", "mergekit", "evomerge"} <= set(meta["tags"])
    for card in (ModelCard.load(path), ModelCard(text)):
        assert card.data.base_model == hub_models
        assert card.data.library_name == "transformers" and "merge" in card.data.tags
        assert card.text == body
    return body


@pytest.mark.slow
def test_exported_card_has_hub_metadata(tmp_path):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(SINGLE))
    run, out = tmp_path / "run", tmp_path / "merged"
    assert main(["search", str(spec_file), "--budget", "2", "--run", str(run)]) == 0
    assert main(["export", str(run), "--out", str(out)]) == 0
    recipe = recipe_from_yaml(out / "evomerge_recipe.yaml")
    assert recipe.model_refs == ["demo:add", "demo:reverse"]  # linear reads no base
    body = check_card(out / "README.md", None)  # demo models are not on the Hub
    # today's card follows the header: title, recipe, scores (with the summary table), the mergekit line
    assert body.startswith("# Merged with evomerge (run `run`, trial ")
    assert recipe.to_yaml().rstrip() in body and "## Scores" in body and "| model | validation | test |" in body
    assert "`mergekit_config.yml` reproduces this merge with mergekit: `mergekit-yaml" in body


def test_card_names_the_hub_models_of_the_recipe(tmp_path):
    """Of Hub ids (with a revision), local paths, LoRA ``base+adapter`` and demo names, only the Hub repository
    ids go into base_model (without the revision), once each and base first."""
    refs = ["org/base-7b@v1.0", "/models/with space: [x]", "org/base-7b+org/lora-adapter", "demo:add"]
    recipe = parse_recipe({"merge_method": "task_arithmetic", "base_model": refs[0],
                           "models": [{"model": m, "parameters": {"weight": 0.5}} for m in [*refs[1:], refs[1]]]})
    assert recipe.model_refs == refs
    path = tmp_path / "README.md"
    path.write_text(model_card("my-run", 7, recipe, {"search": {"t": 0.5}, "fidelity": "full"}, None))
    body = check_card(path, ["org/base-7b", "org/lora-adapter"])  # a LoRA names its base and its adapter
    assert body.startswith("# Merged with evomerge (run `my-run`, trial 7)") and "t 0.5000" in body
    assert "| model |" not in body  # not the winner: no summary table


def test_layerwise_card_names_every_group_model_once(tmp_path):
    """A layer-wise recipe's base_model list: each group's Hub models, in order, once each."""
    recipe = parse_recipe({"base_model": "org/base", "groups": [
        {"layers": [0, 2], "merge_method": "task_arithmetic",
         "models": [{"model": "org/add", "parameters": {"weight": 0.5}}]},
        {"layers": [2, 4], "merge_method": "linear",
         "models": [{"model": "org/sort@main", "parameters": {"weight": 0.5}},
                    {"model": "org/add", "parameters": {"weight": 0.5}}]}]})
    assert isinstance(recipe, LayerwiseRecipe)
    path = tmp_path / "README.md"
    layout = LayerLayout(prefix="model.layers.", num_layers=4,
                         block_tensors=tuple(f"model.layers.{i}.mlp.weight" for i in range(4)))
    path.write_text(model_card("lw", 3, recipe, {"search": {"t": 1.0}, "fidelity": "full"}, layout))
    body = check_card(path, ["org/base", "org/add", "org/sort"])
    assert "Method per layer:\n\n| L0 | L1 | L2 | L3 |\n|---|---|---|---|\n" \
        "| task_arithmetic | task_arithmetic | linear | linear |\n" in body
    # each model's weight on the blocks of the groups that merge it
    assert "| org/add | 0.500 | 0.500 | 0.500 | 0.500 |\n| org/sort@main | - | - | 0.500 | 0.500 |\n" in body
    assert "`mergekit_multi.yml` reproduces this merge with mergekit: `mergekit-multi" in body
