"""Layer-wise recipes (a merge method per range of blocks): each group's blocks are exactly its single-method
merge, the outer tensors the ``outer`` group's; sampled from a search space, merged live, checked against
mergekit-multi, refused with one line when malformed, and searched end to end through the CLI."""

import json
import re
import shutil
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from evomerge.cli import main
from evomerge.errors import SpecError
from evomerge.layout import LayerLayout
from evomerge.merge import LiveMerger, merge_to_folder
from evomerge.models import open_checkpoint
from evomerge.params import resolve_params
from evomerge.recipes import LayerwiseRecipe, Recipe, parse_recipe, recipe_from_yaml
from evomerge.registry import get_method
from evomerge.run import STUDY_NAME, Attr, RunFolder, counted, structured_attr
from evomerge.space import WeightSpace
from evomerge.spec import SearchSpec

BLOCK = re.compile(r"^(?:model\.layers|transformer\.h)\.(\d+)\.")  # llama and GPT-2 blocks, parsed here on purpose


def weights(path) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(str(path))
    return {n: ckpt.read(n) for n in ckpt.tensors}


def block_of(name: str) -> int | None:
    match = BLOCK.match(name)
    return int(match.group(1)) if match else None


def group_of(doc: dict, name: str) -> int:
    """The group whose method must have merged tensor ``name``: the one holding its block, else ``outer``."""
    block = block_of(name)
    if block is None:
        return doc.get("outer", 0)
    (index,) = [i for i, g in enumerate(doc["groups"]) if g["layers"][0] <= block < g["layers"][1]]
    return index


def single_method(doc: dict, group: dict) -> Recipe:
    """The single-method recipe of one group: its method, models and parameters, the recipe's base, seed, dtype."""
    shared = {k: doc[k] for k in ("base_model", "seed", "dtype", "out_dtype") if k in doc}
    return Recipe(merge_method=group["merge_method"], models=group["models"], parameters=group.get("parameters", {}),
                  **shared)


def entry(model, **params) -> dict:
    return {"model": str(model), "parameters": params} if params else {"model": str(model)}


def cases(z, g) -> dict[str, dict]:
    """Layer-wise recipes over the 3-block llama zoo ``z`` and the 2-block GPT-2 zoo ``g``, with gradients,
    filters, seeded methods and both outers."""
    base, a, b, c = (str(z[k]) for k in ("base", "a", "b", "c"))
    return {
        "ties|task_arithmetic|slerp outer=0": {
            "base_model": base, "outer": 0, "groups": [
                {"layers": [0, 1], "merge_method": "ties", "parameters": {"lambda": 1.0},
                 "models": [entry(a, weight=[0.2, 1.0], density=0.5), entry(b, weight=0.4, density=[0.3, 0.9])]},
                {"layers": [1, 2], "merge_method": "task_arithmetic", "parameters": {"lambda": 0.8},
                 "models": [entry(a, weight=0.7), entry(c, weight=[1.0, 0.0])]},
                {"layers": [2, 3], "merge_method": "slerp", "parameters": {"t": [0.1, 0.9]},
                 "models": [entry(base), entry(b)]}]},
        "dare_ties|linear outer=last": {
            "base_model": base, "outer": 1, "seed": 5, "groups": [
                {"layers": [0, 1], "merge_method": "dare_ties",
                 "models": [entry(a, weight=1.0, density=0.5), entry(b, weight=0.6, density=[0.4, 0.8])]},
                {"layers": [1, 3], "merge_method": "linear",
                 "models": [entry(a, weight=[0.0, 1.0]), entry(b, weight=1.0), entry(c, weight=0.3)]}]},
        "della|breadcrumbs_ties|task_arithmetic bf16 outer=last": {
            "base_model": base, "outer": 2, "seed": 11, "dtype": "bfloat16", "groups": [
                {"layers": [0, 1], "merge_method": "della",
                 "models": [entry(m, weight=1.0, density=0.6, epsilon=0.1) for m in (a, b, c)]},
                {"layers": [1, 2], "merge_method": "breadcrumbs_ties",
                 "models": [entry(m, weight=0.5, density=[0.4, 0.9], gamma=0.05) for m in (a, b)]},
                {"layers": [2, 3], "merge_method": "task_arithmetic",
                 "models": [entry(a, weight=[{"filter": "mlp", "value": 0.9}, {"value": 0.2}]),
                            entry(c, weight=0.5)]}]},
        "gpt2 task_arithmetic|dare_linear outer=0": {
            "base_model": str(g["base"]), "seed": 3, "groups": [
                {"layers": [0, 1], "merge_method": "task_arithmetic", "parameters": {"lambda": 1.2},
                 "models": [entry(g["a"], weight=0.6), entry(g["b"], weight=[0.2, 0.8])]},
                {"layers": [1, 2], "merge_method": "dare_linear",
                 "models": [entry(g["a"], weight=1.0, density=0.6), entry(g["b"], weight=0.5, density=0.4)]}]},
    }


FAKE = {k: k for k in ("base", "a", "b", "c")}
CASE_NAMES = list(cases(FAKE, FAKE))


def assert_groups_merged_as_single_methods(doc: dict, got: dict, singles: list[dict]) -> None:
    """Every tensor is bit for bit its group's single-method merge, and no other group's (so that the
    comparison tells the groups apart)."""
    assert set(got) == set(singles[0])
    for name, tensor in got.items():
        g = group_of(doc, name)
        assert tensor.dtype == singles[g][name].dtype, name
        assert torch.equal(tensor, singles[g][name]), f"{name}: not group {g}'s {doc['groups'][g]['merge_method']}"
        for h, other in enumerate(singles):
            if h != g:
                assert not torch.equal(other[name], singles[g][name]), f"{name}: groups {g} and {h} agree"


@pytest.fixture(scope="module", params=CASE_NAMES)
def merged(request, llama_zoo, gpt2_zoo, tmp_path_factory):
    """A layer-wise case streamed to a folder, and each group's single-method merge of the whole model."""
    doc = cases(llama_zoo, gpt2_zoo)[request.param]
    root = tmp_path_factory.mktemp("layerwise")
    recipe = parse_recipe(doc)
    assert isinstance(recipe, LayerwiseRecipe)
    out = merge_to_folder(recipe, root / "layerwise")
    singles = [weights(merge_to_folder(single_method(doc, g), root / f"single-{i}")) for i, g in
               enumerate(doc["groups"])]
    return doc, recipe, out, singles


def test_streamed_merge_is_each_groups_single_method_merge(merged):
    doc, recipe, out, singles = merged
    assert_groups_merged_as_single_methods(doc, weights(out), singles)
    assert recipe_from_yaml(out / "evomerge_recipe.yaml") == recipe  # the recipe written beside the weights
    assert (out / "mergekit_multi.yml").exists() and not (out / "mergekit_config.yml").exists()


def test_gradients_keep_whole_model_layer_positions(llama_zoo, tmp_path):
    """A gradient inside a group is read at the block's position in the whole model (block i of 3 at
    i/2), not at its position inside the group; the outer tensors sit at position 0."""
    z = {k: str(v) for k, v in llama_zoo.items()}
    doc = {"base_model": z["base"], "outer": 1, "groups": [
        {"layers": [0, 2], "merge_method": "linear", "models": [entry(z["a"], weight=[0.0, 1.0]), entry(z["b"])]},
        {"layers": [2, 3], "merge_method": "slerp", "parameters": {"t": [0.0, 1.0]},
         "models": [entry(z["base"]), entry(z["b"])]}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    assert main(["merge", str(path), "--out", str(out)]) == 0
    got, base, a, b = weights(out), weights(z["base"]), weights(z["a"]), weights(z["b"])
    for name in got:
        # (what the whole-model position gives, what a position counted inside the group would give)
        expected, group_local = {
            0: (b[name], None),  # weight of a at position 0: b alone (also group-local)
            1: ((0.5 * a[name] + b[name]) / 1.5, (a[name] + b[name]) / 2),  # position 1/2, not 1
            2: (b[name], base[name]),  # slerp at t=1: b; the group's only block would be at t=0: the base
            None: (base[name], b[name]),  # outer tensors follow group 1 (slerp) at position 0: the base
        }[block_of(name)]
        torch.testing.assert_close(got[name], expected, rtol=0, atol=1e-6, msg=name)
        if group_local is not None:
            assert not torch.allclose(group_local, expected, rtol=0, atol=1e-4), f"{name}: the check cannot tell"


def test_live_merge_equals_streamed_merge(merged):
    doc, recipe, out, _ = merged
    models = [m for m in recipe.model_refs if m != recipe.base_model]
    model = AutoModelForCausalLM.from_pretrained(recipe.base_model, dtype=torch.float32)
    merger = LiveMerger(model, recipe.base_model, models)
    merger.apply(Recipe(merge_method="linear", models=[entry(models[0])]))  # state left by another candidate
    merger.apply(recipe)
    streamed = weights(out)
    params = dict(model.named_parameters())
    assert set(params) == set(streamed)
    for name, param in params.items():
        # the live model stays float32; the streamed folder holds the recipe's dtype
        assert torch.equal(param.detach().to(streamed[name].dtype), streamed[name]), name


# ----------------------------------------------------------------------------- sampled recipes


def zoo_spec(llama_zoo, **space) -> SearchSpec:
    return SearchSpec.model_validate({
        "base_model": str(llama_zoo["base"]), "models": [str(llama_zoo["a"]), str(llama_zoo["b"])], "seed": 4,
        "space": {"methods": ["linear", "ties", "task_arithmetic", "dare_ties"], "method_granularity": "groups:2",
                  "parameters": {"weight": {"low": 0.0, "high": 1.0}, "density": {"low": 0.1, "high": 1.0},
                                 "lambda": {"low": 0.5, "high": 1.5}}, **space},
        "evaluation": {"tasks": [{"name": "demo_add"}], "include_paths": ["demo"]}})


def expected_params(space: WeightSpace, methods: list[str]) -> set[str]:
    """The Optuna parameters a trial must hold: each group's method and that method's coefficients only."""
    names = set()
    for g, name in enumerate(methods):
        method = get_method(name)
        names.add(f"method[G{g}]")
        for param in space.spec.space.parameters:
            if param in method.parameters:
                names |= {n for row in space._names(method, param, g) for n in row}
    return names


def test_sampled_recipe_puts_each_method_on_its_layers(llama_zoo, tmp_path):
    spec = zoo_spec(llama_zoo, granularity="layer", shared=["lambda"])
    space = WeightSpace(spec, LayerLayout.of(open_checkpoint(str(llama_zoo["base"]))))
    chosen = ["ties", "dare_ties"]
    values: dict = {f"method[G{g}]": m for g, m in enumerate(chosen)}
    names = sorted(expected_params(space, chosen) - set(values))
    ranges = spec.space.parameters
    for i, n in enumerate(names):  # distinct values, each inside its parameter's range
        rng = ranges[re.search(r"\.(\w+)\[", n).group(1)]
        values[n] = round(rng.low + (rng.high - rng.low) * (i + 1) / (len(names) + 1), 4)
    recipe = space.sample(optuna.trial.FixedTrial(values))
    assert isinstance(recipe, LayerwiseRecipe)
    # 3 blocks in 2 groups: blocks 0-1 and block 2; the outer tensors follow group 0
    assert [(g.layers, g.merge_method) for g in recipe.groups] == [((0, 2), "ties"), ((2, 3), "dare_ties")]
    assert recipe.outer == 0 and recipe.seed == 4 and recipe.base_model == str(llama_zoo["base"])
    # every sampled per-layer value is where its name says: G<g>.<method>.<param>[m<i>][L<block>-<block>]
    checked = 0
    for name, value in values.items():
        match = re.fullmatch(r"G(\d)\.(\w+)\.(weight|density)\[m(\d)\]\[L(\d)-\d\]", name)
        if match:
            g, method, param, model, block = match.groups()
            part = recipe.part_for(int(block))
            assert part.merge_method == method == chosen[int(g)]
            tensor = f"model.layers.{block}.mlp.up_proj.weight"
            assert resolve_params(part, tensor, 3).per_model[param][int(model)] == value
            checked += 1
    assert checked == 3 * 2 * 2  # blocks x models x (weight, density)
    outer = resolve_params(recipe.part_for(None), "model.embed_tokens.weight", 3).per_model["weight"]
    assert outer == [values["G0.ties.weight[m0][L0-0]"], values["G0.ties.weight[m1][L0-0]"]]  # group 0's first slot
    assert recipe.part_for(1).parameters["lambda"] == values["G0.ties.lambda[shared][all]"]
    assert recipe.part_for(2).parameters["lambda"] == values["G1.dare_ties.lambda[shared][all]"]

    doc = recipe.model_dump(mode="json")
    out = merge_to_folder(recipe, tmp_path / "sampled")
    singles = [weights(merge_to_folder(single_method(doc, g), tmp_path / f"single-{i}"))
               for i, g in enumerate(doc["groups"])]
    assert_groups_merged_as_single_methods(doc, weights(out), singles)


def test_space_is_conditional_on_each_groups_method(llama_zoo):
    spec = zoo_spec(llama_zoo, granularity="groups:2")
    space = WeightSpace(spec, LayerLayout.of(open_checkpoint(str(llama_zoo["base"]))))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        recipe = space.sample(trial)
        methods = [trial.params["method[G0]"], trial.params["method[G1]"]]
        assert [g.merge_method for g in recipe.groups] == methods
        assert set(trial.params) == expected_params(space, methods), methods
        for g, method in enumerate(methods):  # no coefficient of a method the group did not pick
            prefixes = {k.split(".")[1] for k in trial.params if k.startswith(f"G{g}.")}
            assert prefixes == {method}
        study.tell(trial, 0.0)
        seen.add(tuple(methods))
    assert any(m0 != m1 for m0, m1 in seen) and any(m0 == m1 for m0, m1 in seen)
    assert "linear" in {m for pair in seen for m in pair}  # a method with fewer parameters was drawn too


def test_report_names_the_method_of_each_layer(llama_zoo):
    recipe = parse_recipe(cases(llama_zoo, llama_zoo)["dare_ties|linear outer=last"])
    assert recipe.layer_methods(3) == ["dare_ties", "linear", "linear"]


# ----------------------------------------------------------------------------- mergekit-multi


def run_mergekit_multi(recipe: LayerwiseRecipe, tmp_path, mergekit):
    ours = merge_to_folder(recipe, tmp_path / "ours")
    config = ours / "mergekit_multi.yml"
    assert len(list(yaml.safe_load_all(config.read_text()))) == len(recipe.groups) + 1
    done = mergekit.run("mergekit-multi", config, "--intermediate-dir", tmp_path / "work", "--out-path",
                        tmp_path / "theirs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    return weights(ours), weights(tmp_path / "theirs")


MERGEKIT_CASES = {  # zoo, outer, [(layers, method, parameters, models)]
    "llama ties|task_arithmetic|slerp outer=last": ("llama", 2, [
        ([0, 1], "ties", {"lambda": 0.9}, lambda z: [entry(z["a"], weight=[0.2, 1.0], density=0.5),
                                                     entry(z["c"], weight=0.6, density=[0.3, 0.8])]),
        ([1, 2], "task_arithmetic", {"lambda": 0.8}, lambda z: [
            entry(z["a"], weight=0.7), entry(z["b"], weight=[{"filter": "mlp", "value": 0.3}, {"value": [1.0, 0.0]}])]),
        ([2, 3], "slerp", {"t": [0.1, 0.9]}, lambda z: [entry(z["base"]), entry(z["b"])])]),
    "gpt2 slerp|ties outer=0": ("gpt2", 0, [
        ([0, 1], "slerp", {"t": [{"filter": "attn", "value": 0.7}, {"value": 0.35}]},
         lambda z: [entry(z["base"]), entry(z["b"])]),
        ([1, 2], "ties", {}, lambda z: [entry(m, weight=1.0, density=[0.2, 0.9]) for m in (z["a"], z["b"])])]),
    "llama linear|ties|task_arithmetic outer=0": ("llama", 0, [
        ([0, 1], "linear", {}, lambda z: [entry(z["a"], weight=[0.2, 0.9]), entry(z["b"], weight=0.5)]),
        ([1, 2], "ties", {}, lambda z: [entry(m, weight=1.0, density=0.5) for m in (z["a"], z["b"])]),
        ([2, 3], "task_arithmetic", {"lambda": 0.5}, lambda z: [entry(z["c"], weight=0.8)])]),
}


@pytest.mark.skipif(shutil.which("mergekit-multi") is None, reason="mergekit is not installed")
@pytest.mark.parametrize("case", list(MERGEKIT_CASES))
def test_layerwise_matches_mergekit_multi(case, llama_zoo, gpt2_zoo, tmp_path, mergekit):
    """Deterministic methods: our merge and mergekit-multi's on the mergekit_multi.yml it wrote (one float32
    intermediate per group, then a 1/0 linear pick by block filters, named after the model's layout)."""
    zoo_name, outer, groups = MERGEKIT_CASES[case]
    zoo = {"llama": llama_zoo, "gpt2": gpt2_zoo}[zoo_name]
    recipe = LayerwiseRecipe.model_validate({
        "base_model": str(zoo["base"]), "outer": outer,
        "groups": [{"layers": r, "merge_method": m, "parameters": p, "models": models(zoo)}
                   for r, m, p, models in groups]})
    ours, theirs = run_mergekit_multi(recipe, tmp_path, mergekit)
    assert set(ours) == set(theirs)
    worst = {n: (ours[n] - theirs[n].to(ours[n].dtype)).abs().max().item() for n in ours}
    assert max(worst.values()) <= 1e-5, f"{case}: {max(worst, key=worst.get)} differs by {max(worst.values())}"


# ----------------------------------------------------------------------------- bad recipes


def bad_recipe(z, change) -> dict:
    base, a, b = (str(z[k]) for k in ("base", "a", "b"))
    doc = {"base_model": base, "outer": 0, "groups": [
        {"layers": [0, 2], "merge_method": "ties", "models": [entry(a, weight=0.7, density=0.5)],
         "parameters": {"lambda": 1.0}},
        {"layers": [2, 3], "merge_method": "slerp", "models": [entry(base), entry(b)], "parameters": {"t": 0.3}}]}
    change(doc, a, b)
    return doc


def set_layers(*ranges):
    def change(doc, a, b):
        groups = doc["groups"]
        while len(groups) < len(ranges):
            groups.append(json.loads(json.dumps(groups[-1])))
        for group, r in zip(groups, ranges, strict=False):
            group["layers"] = list(r)
        del groups[len(ranges):]
    return change


def set_in(path, value):
    def change(doc, a, b):
        *parents, last = path
        target = doc
        for key in parents:
            target = target[key]
        target[last] = value(a, b) if callable(value) else value
    return change


BAD = {
    "overlapping ranges": (set_layers((0, 2), (1, 3)),
                           "groups[1].layers [1, 3] overlaps the group before (groups must cover the blocks in order)"),
    "gap": (set_layers((0, 1), (2, 3)), "groups[1].layers [2, 3] leaves block 1 to no group"),
    "first group not at block 0": (set_layers((1, 2), (2, 3)), "groups[0].layers [1, 2] leaves block 0 to no group"),
    "empty range": (set_layers((0, 2), (2, 2), (2, 3)), "groups[1].layers [2, 2] is empty"),
    "ends before the last block": (set_layers((0, 1), (1, 2)),
                                   "the layer groups cover blocks 0-1, but the model has 3 blocks (0-2)"),
    "ends after the last block": (set_layers((0, 2), (2, 4)),
                                  "the layer groups cover blocks 0-3, but the model has 3 blocks (0-2)"),
    "outer names no group": (set_in(["outer"], 2), "outer 2 names no group (there are 2)"),
    "slerp with two models": (set_in(["groups", 1, "models"], lambda a, b: [entry(a), entry(b)]),
                              "groups[1]: method slerp needs 1 model(s) besides the base, got 2"),
    "unknown parameter": (set_in(["groups", 0, "models", 0, "parameters", "gamma"], 0.1),
                          ("groups[0]: models[0] (", "): ties has no parameter 'gamma'")),
    "nan value": (set_in(["groups", 0, "models", 0, "parameters", "density"], float("nan")),
                  "groups.0.models.0.parameters.density: Input should be a finite number"),
    "nan in a gradient": (set_in(["groups", 1, "parameters", "t"], [0.2, float("nan")]),
                          "groups.1.parameters.t.1: Input should be a finite number"),
    "out of range": (set_in(["groups", 1, "parameters", "t"], 1.5),
                     "groups[1]: parameters: t=1.5 is outside [0.0, 1.0]"),
    "unknown method": (set_in(["groups", 0, "merge_method"], "tiez"), "groups[0]: unknown merge method 'tiez'"),
    "unknown group key": (set_in(["groups", 0, "layer_range"], [0, 2]), "groups.0.layer_range: Extra inputs"),
    "no groups": (set_in(["groups"], []), "groups: List should have at least 1 item"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_layerwise_recipe_is_one_line(case, llama_zoo, tmp_path, capsys):
    change, expected = BAD[case]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(bad_recipe(llama_zoo, change)))
    out = tmp_path / "out"
    assert main(["merge", str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert all(fragment in err for fragment in (expected if isinstance(expected, tuple) else (expected,))), err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_live_merger_refuses_groups_that_miss_blocks(llama_zoo):
    model = AutoModelForCausalLM.from_pretrained(llama_zoo["base"], dtype=torch.float32)
    merger = LiveMerger(model, str(llama_zoo["base"]), [str(llama_zoo["a"]), str(llama_zoo["b"])])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    short = parse_recipe(bad_recipe(llama_zoo, set_layers((0, 1), (1, 2))))
    with pytest.raises(SpecError, match=re.escape("cover blocks 0-1, but the model has 3 blocks")):
        merger.apply(short)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# ----------------------------------------------------------------------------- a layer-wise search, end to end

SEARCH = {
    "base_model": "demo:base",
    "models": ["demo:add", "demo:reverse"],
    "space": {"methods": ["linear", "task_arithmetic"], "method_granularity": "groups:2", "granularity": "global",
              "parameters": {"weight": {"low": 0.0, "high": 1.0}, "lambda": {"low": 0.5, "high": 1.5}},
              "shared": ["lambda"]},
    "evaluation": {"include_paths": ["demo"], "search_examples": 8, "screen_examples": None, "top_k": 2,
                   "tasks": [{"name": n, "splits": {"search": "search", "validation": "validation[0:12]",
                                                    "test": "test[0:12]"}} for n in ("demo_add", "demo_reverse")]},
    "sampler": "tpe",
    "seed": 0,
    "device": "cpu",
}


def study_trials(run):
    return optuna.load_study(study_name=STUDY_NAME, storage=RunFolder(Path(run)).default_storage()).get_trials()


@pytest.mark.slow
def test_layerwise_search_status_report_export_resume(tmp_path, capsys, monkeypatch):
    """Budget 6 with a method per half of the demo model, then status, report, export and a resumed budget 8."""
    monkeypatch.setenv("COLUMNS", "200")  # status rows on one line each
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SEARCH))
    run = tmp_path / "run"
    assert main(["search", str(spec), "--budget", "6", "--run", str(run)]) == 0
    trials = study_trials(run)
    assert sum(counted(t) for t in trials) == 6
    recipes = {t.number: parse_recipe(structured_attr(t, Attr.RECIPE)) for t in trials if counted(t)}
    assert all(isinstance(r, LayerwiseRecipe) and [g.layers for g in r.groups] == [(0, 2), (2, 4)]
               for r in recipes.values())
    assert [t.user_attrs.get("baseline") for t in trials[:3]] == ["uniform average", "demo:add alone",
                                                                  "demo:reverse alone"]
    mixed = [n for n, r in recipes.items() if len({g.merge_method for g in r.groups}) > 1]
    assert mixed, "no trial chose two methods"  # the seeded sampler does; the status shows them
    capsys.readouterr()

    assert main(["status", str(run)]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "6/6 finished" in shown and "winner: trial" in shown
    assert "/".join(g.merge_method for g in recipes[mixed[0]].groups) in shown  # each group's method

    assert main(["report", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert parse_recipe(summary["winner_recipe"]) == recipes[summary["winner_trial"]]
    assert "chosen per groups:2" in (run / "report.md").read_text()
    # the per-layer method table appears exactly when the winner's groups differ: the run's own winner, and
    # (in a copy of the run) a winner with two methods, so that the check never depends on which one won
    shutil.copytree(run, tmp_path / "copy")
    (tmp_path / "copy" / "summary.json").write_text(json.dumps(
        {**summary, "winner_trial": mixed[0], "winner_recipe": structured_attr(trials[mixed[0]], Attr.RECIPE)}))
    assert main(["report", str(tmp_path / "copy")]) == 0
    for folder, number in ((run, summary["winner_trial"]), (tmp_path / "copy", mixed[0])):
        report = (folder / "report.md").read_text()
        methods = [g.merge_method for g in recipes[number].groups for _ in range(g.layers[0], g.layers[1])]
        assert f"winner: trial {number}" in report.lower()
        if len(set(methods)) > 1:
            assert "Method per layer" in report and "| " + " | ".join(methods) + " |" in report, report
        else:
            assert "Method per layer" not in report, report

    for trial in (None, mixed[0]):  # the validated winner, and a trial whose groups differ
        out = tmp_path / f"exported-{trial}"
        chosen = [] if trial is None else ["--trial", str(trial)]
        assert main(["export", str(run), "--out", str(out), *chosen]) == 0
        files = {p.name for p in out.iterdir()}
        assert {"mergekit_multi.yml", "evomerge_recipe.yaml", "README.md", "model.safetensors"} <= files
        assert "mergekit_config.yml" not in files
        exported = recipe_from_yaml(out / "evomerge_recipe.yaml")
        assert isinstance(exported, LayerwiseRecipe)
        assert exported == recipes[summary["winner_trial"] if trial is None else trial]
        docs = list(yaml.safe_load_all((out / "mergekit_multi.yml").read_text()))
        assert [d.get("merge_method") for d in docs] == [g.merge_method for g in exported.groups] + ["linear"]
        assert "mergekit-multi mergekit_multi.yml" in (out / "README.md").read_text()
    # the exported mixed trial: each half of the demo model is its group's single-method merge
    doc = exported.model_dump(mode="json")
    singles = [weights(merge_to_folder(single_method(doc, g), tmp_path / f"single-{i}"))
               for i, g in enumerate(doc["groups"])]
    assert_groups_merged_as_single_methods(doc, weights(out), singles)

    assert main(["search", "--resume", str(run), "--budget", "8"]) == 0
    again = study_trials(run)
    assert sum(counted(t) for t in again) == 8
    assert [(t.number, t.params, t.values) for t in again[: len(trials)]] == \
        [(t.number, t.params, t.values) for t in trials]  # the first six are kept, not re-run
    assert all(isinstance(parse_recipe(structured_attr(t, Attr.RECIPE)), LayerwiseRecipe) for t in again if counted(t))
    assert json.loads((run / "summary.json").read_text())["finished_trials"] == 8
