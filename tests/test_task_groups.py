"""lm-eval groups as search tasks: the group score equals plain lm-eval's on the same documents, per-example
scores combine to it, bad groups stop before compute, and a search on a group runs end to end."""

import json
from collections import Counter

import pytest
import torch
import yaml
from helpers import search_refused
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.cli import main
from evomerge.demo import TASKS_DIR, model_path
from evomerge.evaluate import EvalResult, Evaluator
from evomerge.racing import Rung
from evomerge.search import paired_margin
from evomerge.spec import TaskSpec
from evomerge.subsets import FirstDocuments

SIZES = {"sub_a": 30, "sub_b": 12}  # documents per split of each task
SKILL = {"sub_a": "sort", "sub_b": "reverse", "sub_c": "add", "sub_d": "add", "sub_p": "add"}
SPLITS = {"search": "search[2:]", "validation": "validation[1:]", "test": "test"}
START = {"search": 2, "validation": 1, "test": 0}
GROUPS = {
    "grp_size": {"task": ["sub_a", "sub_b"], "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}]},
    "grp_equal": {"task": ["sub_a", "sub_b"], "aggregate_metric_list": [{"metric": "acc", "weight_by_size": False}]},
    "grp_inner": {"task": ["sub_a"]},
    "grp_nested": {"task": ["grp_inner", "sub_b"], "aggregate_metric_list": [{"metric": "acc"}]},
    "grp_noagg": {"task": ["sub_a", "sub_b"]},
    "grp_ppl": {"task": ["sub_a", "sub_p"], "aggregate_metric_list": [{"metric": "acc"}]},
    "grp_nosplit": {"task": ["sub_a", "sub_c"], "aggregate_metric_list": [{"metric": "acc"}]},
    "grp_max": {"task": ["sub_a", "sub_b"], "aggregate_metric_list": [{"metric": "acc", "aggregation": "max"}]},
    "grp_unknown": {"task": ["sub_a", "nope"], "aggregate_metric_list": [{"metric": "acc"}]},
}


def rows(skill: str, split: str) -> list[str]:
    return (TASKS_DIR / "data" / f"{skill}_{split}.jsonl").read_text().splitlines()


@pytest.fixture(scope="module")
def group_dir(tmp_path_factory):
    """Tasks ``sub_a`` (30 documents a split) and ``sub_b`` (12) over relative local JSONL files, ``sub_c``
    without a validation split, ``sub_d`` (10), ``sub_p`` scored by perplexity only; and the groups above."""
    folder = tmp_path_factory.mktemp("groups")
    (folder / "data").mkdir()
    base = yaml.safe_load((TASKS_DIR / "demo_add.yaml").read_text())
    for task, skill in SKILL.items():
        splits = ("search", "test") if task == "sub_c" else ("search", "validation", "test")
        files = {}
        for split in splits:
            files[split] = f"data/{task}_{split}.jsonl"
            (folder / files[split]).write_text("\n".join(rows(skill, split)[: SIZES.get(task, 10)]) + "\n")
        config = {**base, "task": task, "dataset_kwargs": {"data_files": files}}
        if task == "sub_p":
            config["metric_list"] = [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}]
        (folder / f"{task}.yaml").write_text(yaml.safe_dump(config))
    for name, group in GROUPS.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({"group": name, **group}))
    return folder


@pytest.fixture(scope="module")
def lm():
    model = AutoModelForCausalLM.from_pretrained(model_path("base"), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_path("base"))


def layout(role: str) -> list[tuple[str, int]]:
    """The group's doc ids, as documented: positions in its tasks' documents laid end to end (lm-eval's order)."""
    return [(task, d) for task, size in SIZES.items() for d in range(START[role], size)]


def lm_eval_group_score(model, tok, folder, group: str, role: str, docs: dict[str, list[int]]) -> float:
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    fresh = TaskManager(include_path=str(folder), include_defaults=False).load([group])
    for task in fresh["tasks"].values():
        task.config.test_split = role
    out = evaluate(HFLM(pretrained=model, tokenizer=tok, batch_size=16), fresh, samples=docs, log_samples=True,
                   bootstrap_iters=0)
    return out["results"][group]["acc,none"]


@pytest.mark.parametrize("group", ["grp_size", "grp_equal", "grp_nested"])
def test_group_score_equals_lm_eval(group_dir, lm, monkeypatch, group):
    """On a whole role and on the first ids a search takes; weight_by_size true, false, and a nested group."""
    model, tok = lm
    ev = Evaluator(model, tok, [TaskSpec(name=group, splits=SPLITS)], [group_dir], batch_size=16)
    monkeypatch.chdir(group_dir)  # plain lm-eval reads the YAML's data_files relative to the working directory
    for role, ids in [("validation", None), ("search", ev.doc_ids(group, "search")[:9])]:
        got = ev.evaluate(role, None if ids is None else {group: ids})
        chosen = [layout(role)[i] for i in (ids if ids is not None else range(len(layout(role))))]
        docs = {task: sorted(d for t, d in chosen if t == task) for task in SIZES}
        expected = lm_eval_group_score(model, tok, group_dir, group, role, docs)
        assert got.scores[group] == pytest.approx(expected, abs=1e-6), role
        assert sorted(got.examples[group]) == sorted(ids if ids is not None else range(len(layout(role))))
        assert 0 < got.scores[group] < 1
        if group != "grp_equal":  # size-weighted: the plain mean of the concatenated examples
            examples = got.examples[group].values()
            assert got.scores[group] == pytest.approx(sum(examples) / len(examples), abs=1e-12)


def test_group_examples_combine_to_its_score(group_dir, lm):
    """An equal-weight group's examples weigh each task equally; scores on two parts merge to the score on
    both, and the screen vector sums to the weighted score, beside a single task."""
    model, tok = lm
    tasks = [TaskSpec(name="grp_equal", splits=SPLITS, weight=2), TaskSpec(name="sub_d", splits=SPLITS)]
    ev = Evaluator(model, tok, tasks, [group_dir], batch_size=16)
    ids = {t.name: ev.doc_ids(t.name, "search")[:24] for t in tasks}
    whole = ev.evaluate("search", ids)
    equal = whole.examples["grp_equal"]
    by_task = {t: [v for d, v in equal.items() if layout("search")[d][0] == t] for t in SIZES}
    assert whole.scores["grp_equal"] == pytest.approx(sum(sum(v) / len(v) for v in by_task.values()) / 2, abs=1e-12)
    assert sum(len(v) for v in by_task.values()) == 24

    first = ev.evaluate("search", {t: v[:7] for t, v in ids.items()})
    rest = ev.evaluate("search", {t: v[7:] for t, v in ids.items()})
    assert first.merged(rest).scores == pytest.approx(whole.scores, abs=1e-12)
    screen = Rung({t: v[:7] for t, v in ids.items()}, FirstDocuments(ids), {t.name: t.weight for t in tasks})
    assert sum(screen.vector(first)) == pytest.approx(first.score, abs=1e-12)


def test_paired_margin_weighs_a_groups_tasks_as_its_score():
    """Winner vs reference: the mean per-example difference is the weighted score difference, an equal-weight
    group's examples weighed per task (``a`` 2/3 right on task a, 0 on b; ``b`` 0 and 1)."""
    strata = {"g": {0: "a", 1: "a", 2: "a", 3: "b"}}
    weights = {"g": 2.0, "t": 1.0}
    a = EvalResult({}, {"g": {0: 1.0, 1: 1.0, 2: 0.0, 3: 0.0}, "t": {5: 1.0}}, weights, strata)
    b = EvalResult({}, {"g": {0: 0.0, 1: 0.0, 2: 0.0, 3: 1.0}, "t": {5: 0.0}}, weights, strata)
    assert a.example_weights("g", [0, 1, 2, 3]) == pytest.approx({0: 1 / 6, 1: 1 / 6, 2: 1 / 6, 3: 1 / 2})
    assert paired_margin(a, b)["mean"] == pytest.approx((2 * 1 / 3 + 1) / 3 - (2 * 1 / 2 + 0) / 3)


def test_search_ids_are_a_stratified_sample(group_dir, lm):
    """Any prefix of a group's ids draws from its tasks by their weight in the group score."""
    ev = Evaluator(*lm, [TaskSpec(name="grp_size", splits=SPLITS)], [group_dir], batch_size=16)
    taken = Counter(layout("search")[i][0] for i in ev.doc_ids("grp_size", "search")[:19])
    assert taken == {"sub_a": 14, "sub_b": 5}  # 28 and 10 documents: half of each
    equal = Evaluator(*lm, [TaskSpec(name="grp_equal", splits=SPLITS)], [group_dir], batch_size=16)
    order = [layout("search")[i][0] for i in equal.doc_ids("grp_equal", "search")]
    assert order[:20] == ["sub_a", "sub_b"] * 10 and order[20:] == ["sub_a"] * 18


def test_task_options_apply_to_every_task_of_a_group(group_dir, lm):
    ev = Evaluator(*lm, [TaskSpec(name="grp_nested", splits=SPLITS, num_fewshot=1)], [group_dir], batch_size=16)
    for task in SIZES:
        built = ev._loaded["search"]["tasks"][ev.task_key(task, "search")]
        assert built.config.num_fewshot == 1
        built.build_all_requests(samples=[3])
        assert len(built.instances[0].args[0].split("\n\n")) == 2  # one example, then the prompt


SPEC = {
    "base_model": "demo:base",
    "models": ["demo:add", "demo:reverse"],
    "space": {"methods": ["linear"], "granularity": "global", "parameters": {"weight": {"low": 0.0, "high": 1.0}}},
    "evaluation": {"tasks": [{"name": "grp_size"}], "search_examples": 20, "screen_examples": 8, "top_k": 2},
    "sampler": "random",
    "seed": 3,
}


@pytest.mark.slow
@pytest.mark.parametrize(("tasks", "message"), [
    ([{"name": "grp_noagg"}], "group grp_noagg has no aggregate_metric_list, so lm-eval gives it no score; add one "
                              "(metric, aggregation: mean, weight_by_size) to its YAML"),
    ([{"name": "grp_ppl"}], "group grp_ppl: task sub_p has no metric 'acc,none'; it has: perplexity"),
    ([{"name": "grp_nosplit"}],
     "group grp_nosplit: task sub_c has no split 'validation' (splits.validation); it has: search, test"),
    ([{"name": "grp_size", "splits": {"search": "search[0:20]"}}],
     "group grp_size: task sub_b splits.search 'search[0:20]' reaches past the end of split 'search' (12 documents)"),
    ([{"name": "grp_size", "metric": "acc_norm"}], "task grp_size has no metric 'acc_norm'; it has: acc"),
    ([{"name": "grp_size", "gen_kwargs": {"max_gen_toks": 5}}],
     "group grp_size: task sub_a: gen_kwargs apply to generate_until tasks only; it is loglikelihood"),
    ([{"name": "grp_max"}], "task grp_max: Currently, 'mean' is the only pre-defined aggregation. Got 'max'."),
    ([{"name": "grp_unknown"}], "group grp_unknown: task 'nope' not found (is its folder in include_paths? a task "
                                "defined inside a group's YAML is not supported)"),
    ([{"name": "grp_size"}, {"name": "sub_b"}],
     "task sub_b is listed twice (by group grp_size and evaluation.tasks); lm-eval scores a task once"),
])
def test_bad_group_stops_before_compute(group_dir, tmp_path, capsys, tasks, message):
    doc = json.loads(json.dumps(SPEC))
    doc["evaluation"].update(tasks=tasks, include_paths=[str(group_dir)])
    search_refused(doc, tmp_path, capsys, message)


@pytest.mark.slow
def test_search_on_a_group_of_demo_tasks(tmp_path):
    """The demo's add and reverse tasks as one equal-weight group, beside demo_sort, screened and re-checked."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    group = {"group": "demo_skills", "task": ["demo_add", "demo_reverse"],
             "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": False}]}
    (folder / "demo_skills.yaml").write_text(yaml.safe_dump(group))
    doc = json.loads(json.dumps(SPEC))
    small = {"validation": "validation[0:30]", "test": "test[0:30]"}
    doc["evaluation"].update(include_paths=["demo", str(folder)], tasks=[
        {"name": "demo_skills", "weight": 2, "splits": small}, {"name": "demo_sort", "splits": small}])
    spec, run = tmp_path / "spec.yaml", tmp_path / "run"
    spec.write_text(yaml.safe_dump(doc))
    assert main(["search", str(spec), "--budget", "4", "--run", str(run)]) == 0
    log = [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines()]
    assert len(log) == 4 and all(set(row["scores"]) == {"demo_skills", "demo_sort"} for row in log)
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["table"]["uniform average"]["test_tasks"]) == {"demo_skills", "demo_sort"}


def test_answer_strata_of_a_group_keep_its_tasks_parts(group_dir, lm):
    """An answer-stratified subset of a group that weighs its tasks equally: each document's evidence is its
    own task's, strata form within each member task, and each task's strata hold half of the pool's mass; the
    weighted score of the whole pool drawn as the subset is the group's own score."""
    from evomerge.subsets import AnswerStrata

    ev = Evaluator(*lm, [TaskSpec(name="grp_equal", splits=SPLITS)], [group_dir], batch_size=16)
    pool = {"grp_equal": ev.doc_ids("grp_equal", "search")}
    whole = ev.evaluate("search", pool)
    alone = {t: ev_t.evaluate("search").evidence[t] for t, ev_t in
             ((t, Evaluator(*lm, [TaskSpec(name=t, splits=SPLITS)], [group_dir], batch_size=16)) for t in SIZES)}
    members = layout("search")
    assert whole.evidence["grp_equal"] == pytest.approx({i: alone[members[i][0]][members[i][1]]
                                                         for i in pool["grp_equal"]}, abs=1e-4)
    subset = AnswerStrata.from_answers(pool, [whole], size=len(pool["grp_equal"]))
    parts = Counter()
    for stratum, mass in subset.mass["grp_equal"].items():
        parts[stratum.split(":")[0]] += mass
    assert parts == pytest.approx({"sub_a": 0.5, "sub_b": 0.5})
    assert subset.weigh(whole).scores["grp_equal"] == pytest.approx(whole.scores["grp_equal"], abs=1e-12)
