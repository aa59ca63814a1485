"""Generative tasks (generate_until with an answer filter) on the demo zoo: the same skill scored by
greedy generation and by one teacher-forced pass agrees document for document; batching does not change
answers; a search on a generative task exports the model it scored."""

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.cli import main
from evomerge.demo import TASKS_DIR
from evomerge.evaluate import Evaluator
from evomerge.refs import resolve_model_path
from evomerge.run import RunFolder
from evomerge.spec import TaskSpec

GEN = TaskSpec(name="demo_add_gen", metric="exact_match")


def evaluator(name: str, tasks: list[TaskSpec], batch_size: int = 64) -> Evaluator:
    path = resolve_model_path(f"demo:{name}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return Evaluator(model, AutoTokenizer.from_pretrained(path), tasks, [TASKS_DIR], batch_size=batch_size)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["base", "add", "reverse"])
def test_greedy_generation_agrees_with_the_teacher_forced_argmax(name):
    """Greedy decoding reproduces the target exactly iff every target character is the argmax given the
    ones before it, which is what demo_add's loglikelihood ``acc`` (is_greedy) measures."""
    ev = evaluator(name, [GEN, TaskSpec(name="demo_add")])
    result = ev.evaluate("search", {"demo_add_gen": range(60), "demo_add": range(60)})
    assert result.examples["demo_add_gen"] == result.examples["demo_add"]
    assert result.scores["demo_add_gen"] == result.scores["demo_add"]


@pytest.mark.slow
def test_batched_generation_gives_the_answers_of_one_at_a_time():
    one = evaluator("add", [GEN], batch_size=1).evaluate("search", {"demo_add_gen": range(24)})
    many = evaluator("add", [GEN], batch_size=16).evaluate("search", {"demo_add_gen": range(24)})
    assert one.examples == many.examples and one.scores["demo_add_gen"] > 0.8


@pytest.mark.slow
def test_a_search_on_a_generative_task_exports_what_it_scored(tmp_path):
    spec = {"base_model": "demo:base", "models": ["demo:add", "demo:reverse"],
            "space": {"methods": ["linear"], "granularity": "global"},
            "evaluation": {"include_paths": ["demo"], "tasks": [{"name": "demo_add_gen", "metric": "exact_match"},
                                                                {"name": "demo_reverse"}],
                           "search_examples": 30, "screen_examples": 10, "top_k": 2},
            "sampler": "random", "seed": 2}
    path, run = tmp_path / "gen.yaml", RunFolder(tmp_path / "run")
    path.write_text(yaml.safe_dump(spec))
    assert main(["search", str(path), "--budget", "5", "--run", str(run.root)]) == 0
    summary = json.loads(run.summary.read_text())
    assert summary["table"]["parent demo:add"]["test_tasks"]["demo_add_gen"] > 0.8  # the expert generates sums
    out = tmp_path / "merged"
    assert main(["export", str(run.root), "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ev = Evaluator(model, AutoTokenizer.from_pretrained(out), [GEN, TaskSpec(name="demo_reverse")], [TASKS_DIR])
    fresh = ev.evaluate("search", {"demo_add_gen": range(30), "demo_reverse": range(30)}).scores
    winner = summary["winner_trial"]
    recorded = next(t for t in run.trials() if t.number == winner).user_attrs["scores"]
    assert fresh == pytest.approx(recorded, abs=1e-9)
