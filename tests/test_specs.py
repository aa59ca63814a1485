"""The shipped specs: all valid; the demo ones run (shrunk) through every sampler and objective."""

from pathlib import Path

import pytest

from evomerge.demo import DEMO_SPEC
from evomerge.search import RunFolder, Search, check_spec, counted, prepare_run
from evomerge.spec import SearchSpec

SPACES = Path(__file__).resolve().parent.parent / "search_spaces"
SPECS = sorted(p for p in SPACES.glob("*.yaml"))


def test_demo_spec_is_shipped_in_both_places():
    assert (SPACES / "demo.yaml").read_text() == DEMO_SPEC.read_text()


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_spec_validates(path):
    spec = SearchSpec.from_yaml(path)
    assert path.read_text().startswith("#")  # every spec explains itself
    if spec.base_model.startswith("demo:"):
        check_spec(spec)


@pytest.mark.parametrize("name", ["method_choice", "pareto", "slerp_gradient"])
def test_shrunk_spec_runs(name, tmp_path):
    spec = SearchSpec.from_yaml(SPACES / f"{name}.yaml")
    evaluation = spec.evaluation.model_copy(update={"search_examples": 24, "top_k": 2, "screen_examples": (
        8 if spec.evaluation.screen_examples else None)})
    spec = spec.model_copy(update={"evaluation": evaluation})
    run = RunFolder(tmp_path / name)
    prepare_run(spec, run, 5, force=False)
    search = Search(spec, run)
    search.run_budget(5)
    assert sum(counted(t) for t in search.study.get_trials()) == 5
    summary = search.finalize()
    assert summary["winner_trial"] in {t.number for t in search.study.get_trials()}
    assert -1 <= summary["margin_vs_uniform_average"]["mean"] <= 1
