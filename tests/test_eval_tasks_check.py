"""Task checks before any compute: each bad task spec stops with its one-line message; the weighted mean."""

import shutil

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import evomerge.evaluate
from evomerge.demo import TASKS_DIR, model_path
from evomerge.errors import SpecError
from evomerge.evaluate import EvalResult, Evaluator, check_tasks
from evomerge.scores import task_shares, weighted_mean
from evomerge.spec import TaskSpec


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """The demo tasks plus ``bad_files``, whose search split names a file that does not exist, and
    ``single_file``, whose one data file (a string, not a dict) is the split ``train``."""
    folder = tmp_path_factory.mktemp("tasks")
    shutil.copytree(TASKS_DIR, folder, dirs_exist_ok=True)
    config = yaml.safe_load((TASKS_DIR / "demo_add.yaml").read_text())
    bad = {**config, "task": "bad_files",
           "dataset_kwargs": {"data_files": {**config["dataset_kwargs"]["data_files"], "search": "data/gone.jsonl"}}}
    single = {**config, "task": "single_file", "dataset_kwargs": {"data_files": "data/add_test.jsonl"}}
    (folder / "bad_files.yaml").write_text(yaml.safe_dump(bad))
    (folder / "single_file.yaml").write_text(yaml.safe_dump(single))
    return folder


def test_good_tasks_pass(task_dir):
    check_tasks([TaskSpec(name="demo_add", metric="acc,none"),
                 TaskSpec(name="demo_sort", weight=2, splits={"search": "search[0:1000]", "test": "test[499:]"}),
                 TaskSpec(name="single_file", splits={"search": "train[:10]", "validation": "train", "test": "train"})],
                [task_dir])


@pytest.mark.slow
@pytest.mark.parametrize(("task", "message"), [
    ({"name": "no_such_task"}, "task 'no_such_task' not found (is its folder in include_paths?)"),
    ({"name": "demo_add", "metric": "f1"}, "task demo_add has no metric 'f1'; it has: acc"),
    ({"name": "demo_add", "metric": "acc,strict"}, "task demo_add has no metric 'acc,strict'; it has: acc"),
    ({"name": "demo_add", "splits": {"validation": "dev"}},
     "task demo_add has no split 'dev' (splits.validation); it has: search, validation, test"),
    ({"name": "single_file"}, "task single_file has no split 'search' (splits.search); it has: train"),
    ({"name": "bad_files"}, "task bad_files: data file not found: {task_dir}/data/gone.jsonl"),
    ({"name": "demo_add", "splits": {"test": "test[:0]"}}, "task demo_add splits.test 'test[:0]' selects no documents"),
    ({"name": "demo_add", "splits": {"search": "search[900:1001]"}},
     "task demo_add splits.search 'search[900:1001]' reaches past the end of split 'search' (1000 documents)"),
    ({"name": "demo_add", "splits": {"test": "test[500:]"}},
     "task demo_add splits.test 'test[500:]' selects no documents (split 'test' has 500)"),
])
def test_bad_task_spec_is_one_line(task_dir, task, message):
    with pytest.raises(SpecError) as error:
        check_tasks([TaskSpec(**task)], [task_dir])
    assert str(error.value) == message.format(task_dir=task_dir)


def test_a_task_listed_twice():
    with pytest.raises(SpecError, match="^task demo_add is listed twice in evaluation.tasks$"):
        check_tasks([TaskSpec(name="demo_add"), TaskSpec(name="demo_add", weight=2)], [TASKS_DIR])


@pytest.fixture(scope="module")
def base():
    return AutoModelForCausalLM.from_pretrained(model_path("base")), AutoTokenizer.from_pretrained(model_path("base"))


@pytest.mark.parametrize(("task", "message"), [
    ({"name": "demo_add", "metric": "f1"}, "task demo_add has no metric 'f1'; it has: acc"),
    ({"name": "demo_add", "splits": {"test": "dev"}}, "task demo_add has no split 'dev' (splits.test)"),
    ({"name": "demo_add", "splits": {"test": "test[400:600]"}},
     "task demo_add splits.test 'test[400:600]' reaches past the end of split 'test' (500 documents)"),
])
def test_evaluator_checks_the_loaded_task(base, monkeypatch, task, message):
    """What the YAML check could not see (a metric built in Python, a Hub dataset's splits and size) the
    worker finds on the loaded task, with the same message."""
    monkeypatch.setattr(evomerge.evaluate, "_check_configs", lambda *_: None)
    with pytest.raises(SpecError) as error:
        Evaluator(*base, [TaskSpec(**task)], [TASKS_DIR])
    assert str(error.value) == message


def test_weighted_mean_by_hand():
    values, weights = {"a": 0.5, "b": 0.25, "c": 1.0}, {"a": 1.0, "b": 3.0, "c": 0.5}
    assert weighted_mean(values, weights) == pytest.approx((0.5 * 1 + 0.25 * 3 + 1.0 * 0.5) / 4.5)
    assert task_shares(weights) == pytest.approx({"a": 1 / 4.5, "b": 3 / 4.5, "c": 0.5 / 4.5})
    assert EvalResult(values, {}, weights).score == weighted_mean(values, weights)
    with pytest.raises(KeyError):
        weighted_mean({"a": 0.5}, weights)  # a task without a value is an error, not a smaller mean
    with pytest.raises(SpecError, match="sum to -1"):
        weighted_mean(values, {"a": 1.0, "b": -2.0, "c": 0.0})


@pytest.fixture(scope="module")
def filtered_dir(tmp_path_factory):
    """``add_gen``: the add skill as free generation, scored under two filters, ``whole`` (the answer) and
    ``clipped`` (the answer less its last character, which never equals the target)."""
    folder = tmp_path_factory.mktemp("filtered")
    data = {split: str(TASKS_DIR / "data" / f"add_{split}.jsonl") for split in ("search", "validation", "test")}
    config = {"task": "add_gen", "dataset_path": "json", "dataset_kwargs": {"data_files": data}, "test_split": "test",
              "output_type": "generate_until", "doc_to_text": "prompt", "doc_to_target": "{{target[:-1]}}",
              "generation_kwargs": {"until": ["."], "max_gen_toks": 5, "do_sample": False},
              "filter_list": [{"name": "whole", "filter": [{"function": "take_first"}]},
                              {"name": "clipped", "filter": [{"function": "regex", "regex_pattern": "^(.*).$"},
                                                             {"function": "take_first"}]}],
              "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}
    (folder / "add_gen.yaml").write_text(yaml.safe_dump(config))
    return folder


@pytest.mark.parametrize(("metric", "message"), [
    ("exact_match", "task add_gen has metric 'exact_match' under several filters; name one of: "
                    "exact_match,whole, exact_match,clipped"),
    ("acc", "task add_gen has no metric 'acc'; it has: exact_match,whole, exact_match,clipped"),
])
def test_filtered_task_needs_its_filter_named(filtered_dir, metric, message):
    with pytest.raises(SpecError) as error:
        check_tasks([TaskSpec(name="add_gen", metric=metric)], [filtered_dir])
    assert str(error.value) == message


@pytest.mark.slow
@pytest.mark.parametrize("filter_name", ["whole", "clipped"])
def test_filtered_metric_equals_lm_eval(filtered_dir, filter_name):
    """``metric,filter`` scores each example as plain lm-eval does under that filter."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model = AutoModelForCausalLM.from_pretrained(model_path("add")).eval()
    tok = AutoTokenizer.from_pretrained(model_path("add"))
    ids = list(range(12))
    ev = Evaluator(model, tok, [TaskSpec(name="add_gen", metric=f"exact_match,{filter_name}")], [filtered_dir])
    got = ev.evaluate("validation", {"add_gen": ids})
    fresh = TaskManager(include_path=str(filtered_dir), include_defaults=False).load(["add_gen"])
    fresh["tasks"]["add_gen"].config.test_split = "validation"
    out = evaluate(HFLM(pretrained=model, tokenizer=tok, batch_size=64), fresh, samples={"add_gen": ids},
                   log_samples=True, bootstrap_iters=0)
    expected = {s["doc_id"]: s["exact_match"] for s in out["samples"]["add_gen"] if s["filter"] == filter_name}
    assert got.examples["add_gen"] == expected
    assert got.scores["add_gen"] == pytest.approx(out["results"]["add_gen"][f"exact_match,{filter_name}"])
    assert (sum(expected.values()) > 0) == (filter_name == "whole")  # the add expert is right; clipped never is
