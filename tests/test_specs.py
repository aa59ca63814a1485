"""The shipped specs: all valid; the demo ones run (shrunk) through every sampler and objective."""

import json
from pathlib import Path

import pytest
import yaml
from helpers import search_and_finalize
from pydantic import ValidationError

from evomerge.demo import DEMO_SPEC
from evomerge.errors import SpecError
from evomerge.launch import check_spec
from evomerge.spec import SearchSpec

SPACES = Path(__file__).resolve().parent.parent / "search_spaces"
SPECS = sorted(p for p in SPACES.glob("*.yaml"))


def test_demo_spec_is_shipped_in_both_places():
    assert (SPACES / "demo.yaml").read_text() == DEMO_SPEC.read_text()


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_spec_validates(path):
    spec = SearchSpec.from_yaml(path)
    assert path.read_text().startswith("#")  # every spec explains itself
    built = all(ref.startswith("demo:") or Path(ref).expanduser().exists() for ref in spec.models)
    if spec.base_model.startswith("demo:") and built:  # the depth zoo's models exist once its script has run
        check_spec(spec)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["method_choice", "pareto", "slerp_gradient", "layerwise_methods"])
def test_shrunk_spec_runs(name, tmp_path):
    spec = SearchSpec.from_yaml(SPACES / f"{name}.yaml")
    evaluation = spec.evaluation.model_copy(update={"search_examples": 24, "top_k": 2, "screen_examples": (
        8 if spec.evaluation.screen_examples else None)})
    summary = search_and_finalize(spec.model_copy(update={"evaluation": evaluation}), tmp_path / name, 5)
    assert -1 <= summary["margin_vs_uniform_average"]["mean"] <= 1




BASE_SPEC = {
    "base_model": "demo:base", "models": ["demo:add", "demo:reverse"],
    "space": {"methods": ["ties"], "granularity": "layer",
              "parameters": {"weight": {"low": 0.0, "high": 1.0}, "density": {"low": 0.1, "high": 1.0}}},
    "evaluation": {"tasks": [{"name": "demo_add"}, {"name": "demo_sort", "splits": {"search": "search[0:100]"}}],
                   "include_paths": ["demo"]},
}

BAD_VALUES = {
    "nan range": ("space.parameters.weight.low", float("nan"), "space.parameters.weight.low: Input should be a finite"),
    "inf range": ("space.parameters.density.high", float("inf"), "density.high: Input should be a finite number"),
    "range past declared limit": ("space.parameters.weight.high", 20.0, "weight=20.0 is outside [-10.0, 10.0]"),
    "log range from 0": ("space.parameters.density", {"low": 0.0, "high": 1.0, "log": True},
                         "a log range needs low > 0, got 0.0"),
    "fixed out of range": ("space.fixed", {"density": 1.5}, "space.fixed.density: density=1.5 is outside [0.0, 1.0]"),
    "fixed nan": ("space.fixed", {"lambda": float("nan")}, "space.fixed.lambda: Input should be a finite number"),
    "fixed flag": ("space.fixed", {"normalize": 0.5}, "normalize must be true or false, got 0.5"),
    "granularity": ("space.granularity", "gradient:1", "space.granularity 'gradient:1' is not"),
    "no methods": ("space.methods", [], "space.methods: List should have at least 1 item"),
    "method granularity": ("space.method_granularity", "layer", "space.method_granularity 'layer' is not global or"),
    "method groups 0": ("space.method_granularity", "groups:0", "'groups:0' is not global or groups:N"),
    "method groups, one method": ("space.method_granularity", "groups:2",
                                  "method_granularity groups:2 needs at least two space.methods"),
    "method groups, slerp with two models": ("space.methods", ["ties", "slerp"],
                                             "method slerp needs 1 model(s) besides the base, got 2"),
    "no models": ("models", [], "models: List should have at least 1 item"),
    "no tasks": ("evaluation.tasks", [], "evaluation.tasks: List should have at least 1 item"),
    "task weight nan": ("evaluation.tasks.0.weight", float("nan"), "tasks.0.weight: Input should be a finite number"),
    "task weight negative": ("evaluation.tasks.0.weight", -1.0, "tasks.0.weight: Input should be greater than"),
    "task weights sum to 0": ("evaluation.tasks", [{"name": "demo_add", "weight": 0.0}],
                              "the task weights sum to 0; they must sum to more than 0"),
    "split syntax": ("evaluation.tasks.1.splits.search", "search[a:b]",
                     "tasks.1.splits: search: split 'search[a:b]' is not NAME or NAME[start:stop]"),
    "empty split range": ("evaluation.tasks.1.splits.test", "test[5:5]", "test: split 'test[5:5]' is empty"),
    "reversed split range": ("evaluation.tasks.1.splits.test", "test[9:3]", "start must be below stop"),
    "search examples 0": ("evaluation.search_examples", 0, "evaluation.search_examples: Input should be greater than"),
    "screen examples 0": ("evaluation.screen_examples", 0, "evaluation.screen_examples: Input should be greater"),
    "race of no rungs": ("evaluation.screen_examples", [], "screen_examples []: a race needs one or more rungs"),
    "race rung 0": ("evaluation.screen_examples", [0, 10], "screen_examples [0, 10]: a race needs one or more rungs "
                                                           "of 1 example or more"),
    "race shrinking": ("evaluation.screen_examples", [50, 20], "screen_examples [50, 20] must grow from one rung"),
    "race rung fraction": ("evaluation.screen_examples", [10, 2.5], "screen_examples.1: Input should be a valid int"),
    "race past search": ("evaluation.screen_examples", [100, 500], "screen_examples must be below search_examples"),
    "subset kind": ("evaluation.subset", "best", "evaluation.subset: Input should be 'first' or 'answers'"),
    "subset pool without answers": ("evaluation.subset_pool", 1000, "subset_pool is read only with subset: answers"),
    "subset pool 0": ("evaluation.subset_pool", 0, "subset_pool: Input should be greater than or equal to 1"),
    "answers of the whole split": ("evaluation", {**BASE_SPEC["evaluation"], "subset": "answers",
                                                  "search_examples": None}, "subset: answers needs search_examples"),
    "subset pool within the subset": ("evaluation", {**BASE_SPEC["evaluation"], "subset": "answers",
                                                     "subset_pool": 500},
                                      "subset_pool (500) must exceed search_examples (500)"),
    "top_k 0": ("evaluation.top_k", 0, "evaluation.top_k: Input should be greater than or equal to 1"),
    "batch size 0": ("evaluation.batch_size", 0, "evaluation.batch_size: Input should be greater than or equal to 1"),
    "batch size word": ("evaluation.batch_size", "big", "batch_size: Input should be a valid integer, unable to parse "
                                                   "string as an integer or Input should be 'auto'"),
}


def with_value(key: str, value) -> dict:
    doc = json.loads(json.dumps(BASE_SPEC))
    *path, last = key.split(".")
    target = doc
    for part in path:
        target = target[int(part)] if isinstance(target, list) else target.setdefault(part, {})
    target[last] = value
    return doc


def test_base_spec_is_valid():
    SearchSpec.model_validate(BASE_SPEC)


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_spec_value_is_one_line(case, tmp_path):
    key, value, expected = BAD_VALUES[case]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(with_value(key, value)))
    with pytest.raises(SpecError) as err:
        SearchSpec.from_yaml(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and len(message.splitlines()) == 1, message
    assert expected in message, message
    with pytest.raises(ValidationError):
        SearchSpec.model_validate(with_value(key, value))


def test_specs_keep_the_hash_their_run_folders_recorded():
    """Run folders written before method_granularity existed recorded this hash of the demo spec of that time
    (screen 100 of 500 examples); fields added since, at their defaults, stay out of the hash, so those runs
    still resume."""
    from evomerge.spec import spec_hash

    earlier = yaml.safe_load((SPACES / "demo.yaml").read_text())
    earlier["evaluation"].update(search_examples=500, screen_examples=100)
    assert spec_hash(SearchSpec.model_validate(earlier)) == "f03c721198cef942"
    data = yaml.safe_load((SPACES / "method_choice.yaml").read_text())
    assert spec_hash(SearchSpec.model_validate(data)) == "a608daad55f03919"
    data["space"]["method_granularity"] = "groups:2"
    assert spec_hash(SearchSpec.model_validate(data)) != "a608daad55f03919"


def test_gradient_coefficients_do_not_combine_with_method_groups():
    doc = with_value("space.methods", ["ties", "task_arithmetic"])
    doc["space"].update({"method_granularity": "groups:2", "granularity": "gradient:3"})
    with pytest.raises(ValidationError, match="control points outside its blocks"):
        SearchSpec.model_validate(doc)
    doc["space"]["granularity"] = "groups:2"
    assert SearchSpec.model_validate(doc).space.method_groups == 2
