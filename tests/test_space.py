"""Trial parameters become recipes whose per-tensor values are the sampled slot values."""

import optuna
import pytest

from evomerge.layout import LayerLayout
from evomerge.models import open_checkpoint
from evomerge.params import resolve_params
from evomerge.registry import get_method
from evomerge.space import WeightSpace, make_slots
from evomerge.spec import Granularity, SearchSpec

LAYOUT = LayerLayout(prefix="model.layers.", num_layers=4)


def spec(**space):
    return SearchSpec.model_validate({
        "base_model": "demo:base", "models": ["demo:add", "demo:reverse"], "space": space,
        "evaluation": {"tasks": [{"name": "demo_add"}], "include_paths": ["demo"]}})


def test_layout_of_llama_and_gpt2(llama_zoo, gpt2_zoo):
    for zoo, prefix, blocks in ((llama_zoo, "model.layers.", 3), (gpt2_zoo, "transformer.h.", 2)):
        layout = LayerLayout.of(open_checkpoint(str(zoo["base"])))
        assert (layout.prefix, layout.num_layers) == (prefix, blocks)


def test_groups_split_layers_evenly():
    slots = make_slots(Granularity("groups", 2), LAYOUT, [])
    assert [s.filters for s in slots] == [("model.layers.0.", "model.layers.1."),
                                          ("model.layers.2.", "model.layers.3.")]
    assert len(make_slots(Granularity("layer_module"), LAYOUT, ["self_attn", "mlp"])) == 12
    assert len(make_slots(Granularity("gradient", 3), LAYOUT, [])) == 3


@pytest.mark.parametrize("granularity", ["layer", "groups:2", "layer_module", "global"])
def test_sampled_values_land_on_their_tensors(granularity):
    s = spec(granularity=granularity, parameters={"weight": {"low": 0, "high": 1}})
    space = WeightSpace(s, LAYOUT)
    names = [n for row in space._names(get_method("linear"), "weight") for n in row]
    values = {n: round(0.01 * (i + 1), 2) for i, n in enumerate(names)}
    recipe = space.sample(optuna.trial.FixedTrial(values))
    assert recipe.merge_method == "linear"
    n_slots = len(space.slots)
    for i, slot in enumerate(space.slots):
        tensor = f"model.layers.{slot.filters[0].split('.')[2]}.mlp.up_proj.weight" if slot.filters else \
            "model.layers.2.mlp.up_proj.weight"
        if granularity == "layer_module" and not slot.filters[0].endswith("mlp"):
            continue
        got = resolve_params(recipe, tensor, 4).per_model["weight"]
        assert got == [values[names[i]], values[names[n_slots + i]]]
    # embeddings take the first slot's value
    got = resolve_params(recipe, "model.embed_tokens.weight", 4).per_model["weight"]
    assert got == [values[names[0]], values[names[n_slots]]]


def test_gradient_and_shared_parameters():
    s = spec(methods=["ties"], granularity="gradient:2", shared=["lambda"],
             parameters={"weight": {"low": 0, "high": 1}, "density": {"low": 0.1, "high": 1},
                         "lambda": {"low": 0.5, "high": 2}})
    space = WeightSpace(s, LAYOUT)
    values = {"weight[m0][g0]": 0.2, "weight[m0][g1]": 0.8, "weight[m1][g0]": 0.5, "weight[m1][g1]": 0.5,
              "density[m0][g0]": 0.3, "density[m0][g1]": 0.3, "density[m1][g0]": 0.9, "density[m1][g1]": 0.9,
              "lambda[shared][all]": 1.5}
    recipe = space.sample(optuna.trial.FixedTrial(values))
    params = resolve_params(recipe, "model.layers.3.self_attn.q_proj.weight", 4)
    assert params.per_model["weight"] == pytest.approx([0.8, 0.5])
    assert params.shared["lambda"] == 1.5
    assert resolve_params(recipe, "model.layers.0.mlp.up_proj.weight", 4).per_model["weight"] == [0.2, 0.5]


def test_baselines_are_inside_the_space():
    space = WeightSpace(spec(granularity="layer", methods=["linear", "ties"],
                             parameters={"weight": {"low": 0, "high": 1}, "density": {"low": 0.1, "high": 1}}), LAYOUT)
    labels = [label for label, _ in space.baselines()]
    assert labels == ["uniform average", "demo:add alone", "demo:reverse alone", "default ties"]
    for _, params in space.baselines():
        recipe = space.sample(optuna.trial.FixedTrial(params))
        assert recipe.merge_method == params["method"]
