"""The evaluator on the demo zoo: equal to independent greedy decoding; sees in-place weight changes."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.demo import SKILLS, TASKS_DIR, model_path, task_name
from evomerge.errors import SpecError
from evomerge.evaluate import Evaluator, parse_split
from evomerge.spec import TaskSpec

N = 40


def greedy_exact_match(model, tok, rows) -> list[float]:
    """Generate greedily until the end mark and compare the whole answer, one prompt at a time."""
    out = []
    for row in rows:
        ids = torch.tensor([tok.encode(row["prompt"])])
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(row["target"]) + 2,
                             do_sample=False, pad_token_id=tok.pad_token_id)
        text = tok.decode(gen[0, ids.shape[1]:])
        answer = text[: text.index(".") + 1] if "." in text else text
        out.append(float(answer == row["target"]))
    return out


@pytest.fixture(scope="module")
def live():
    model = AutoModelForCausalLM.from_pretrained(model_path("add"), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_path("add"))
    tasks = [TaskSpec(name=task_name(s), splits={"test": "test[100:200]"}) for s in SKILLS]
    return model, tok, Evaluator(model, tok, tasks, [TASKS_DIR], batch_size=32)


def rows(skill, split):
    return [json.loads(line) for line in (TASKS_DIR / "data" / f"{skill}_{split}.jsonl").open()]


@pytest.mark.slow
def test_scores_equal_greedy_decoding(live):
    model, tok, ev = live
    ids = {task_name(s): list(range(5, 5 + N)) for s in SKILLS}
    result = ev.evaluate("search", ids)
    for skill in SKILLS:
        expected = greedy_exact_match(model, tok, rows(skill, "search")[5 : 5 + N])
        got = [result.examples[task_name(skill)][i] for i in range(5, 5 + N)]
        assert got == expected, skill
        assert result.scores[task_name(skill)] == pytest.approx(sum(expected) / N)
    assert result.score == pytest.approx(sum(result.scores.values()) / 3)


def test_evidence_is_the_targets_log_probability(live):
    """A loglikelihood task's per-document evidence (what an answer-stratified subset sorts by) is the model's
    log-probability of the target after the prompt, computed here by a plain forward pass."""
    model, tok, ev = live
    result = ev.evaluate("search", {task_name("add"): list(range(5, 15))})
    for i, row in enumerate(rows("add", "search")[5:15], start=5):
        prompt, target = tok.encode(row["prompt"]), tok.encode(row["target"])
        with torch.no_grad():
            logits = model(torch.tensor([prompt + target])).logits[0].log_softmax(-1)
        by_hand = sum(logits[len(prompt) - 1 + j, t].item() for j, t in enumerate(target))
        assert result.evidence[task_name("add")][i] == pytest.approx(by_hand, abs=1e-4)


def test_doc_id_range_selects_split_slice(live):
    model, tok, ev = live
    assert ev.doc_ids(task_name("sort"), "test") == list(range(100, 200))
    result = ev.evaluate("test", {task_name("sort"): range(100, 120), task_name("add"): [150],
                                  task_name("reverse"): [199]})
    expected = greedy_exact_match(model, tok, rows("sort", "test")[100:120])
    assert [result.examples[task_name("sort")][i] for i in range(100, 120)] == expected


def test_in_place_weight_change_is_seen(live):
    model, tok, ev = live
    ids = {task_name(s): range(N) for s in SKILLS}
    before = ev.evaluate("validation", ids).scores
    reverse = AutoModelForCausalLM.from_pretrained(model_path("reverse"), dtype=torch.float32)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(reverse.get_parameter(name))
    try:
        after = ev.evaluate("validation", ids).scores
        expected = greedy_exact_match(model, tok, rows("reverse", "validation")[:N])
        assert after[task_name("reverse")] == pytest.approx(sum(expected) / N)
        assert after != before
    finally:
        model.load_state_dict(saved)
    assert ev.evaluate("validation", ids).scores == before


@pytest.mark.slow
def test_bad_task_and_split():
    with pytest.raises(SpecError, match="not NAME or NAME"):
        parse_split("test[a:b]")
    model = AutoModelForCausalLM.from_pretrained(model_path("base"))
    tok = AutoTokenizer.from_pretrained(model_path("base"))
    with pytest.raises(SpecError, match="task .no_such_task. not found"):
        Evaluator(model, tok, [TaskSpec(name="no_such_task")], [TASKS_DIR])


def test_vectorized_scoring_equals_lm_eval_loop(live):
    """Our batched continuation scoring returns lm-eval's own (log-prob, is_greedy) for the same requests."""
    from lm_eval.models.huggingface import HFLM

    model, tok, ev = live
    reference = HFLM(pretrained=model, tokenizer=tok, batch_size=7)
    requests = []
    for skill in SKILLS:
        for row in rows(skill, "validation")[:30]:
            ctx, cont = tok.encode(row["prompt"]), tok.encode(row["target"])
            requests.append(((row["prompt"], row["target"]), ctx, cont))
    expected = reference._loglikelihood_tokens(requests, disable_tqdm=True)
    got = ev.lm._loglikelihood_tokens(requests)
    assert [g for _, g in got] == [g for _, g in expected]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in expected], abs=1e-4)
    assert any(g for _, g in got) and not all(g for _, g in got)


def test_unsorted_doc_ids_map_to_their_documents(live):
    model, tok, ev = live
    ids = [30, 3, 17, 4]
    result = ev.evaluate("search", {task_name("add"): ids, task_name("reverse"): [2], task_name("sort"): [9, 1]})
    expected = greedy_exact_match(model, tok, [rows("add", "search")[i] for i in ids])
    assert [result.examples[task_name("add")][i] for i in ids] == expected


def test_cached_requests_equal_lm_eval_built_afresh(live, monkeypatch):
    """Overlapping subsets in any order, and a repeat, score exactly as lm-eval building its requests anew."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tok, ev = live
    monkeypatch.chdir(TASKS_DIR)  # plain lm-eval reads the YAML's data_files relative to the working directory
    name = task_name("sort")
    reference = HFLM(pretrained=model, tokenizer=tok, batch_size=32)
    fresh = TaskManager(include_path=str(TASKS_DIR), include_defaults=False).load([name])
    fresh["tasks"][name].config.test_split = "validation"
    subsets = [[0, 2, 9, 42], [2, 6, 7, 42, 43], [0, 2, 9, 42]]  # the add expert gets docs 2 and 42 right
    first = None
    for ids in subsets:
        got = ev.evaluate("validation", {name: ids}).examples[name]
        out = evaluate(reference, fresh, samples={name: ids}, log_samples=True, bootstrap_iters=0)
        expected = {int(s["doc_id"]): float(s["acc"]) for s in out["samples"][name]}
        assert got == expected
        first = first or got
    assert got == first and 0 < sum(got.values()) < len(got)


def test_auto_batch_size_probes_once_and_scores_the_same(live):
    model, tok, ev = live
    auto = Evaluator(model, tok, list(ev.tasks.values()), [TASKS_DIR], batch_size="auto")
    probes = []
    detect = auto.lm._detect_batch_size
    auto.lm._detect_batch_size = lambda *a, **k: probes.append(a) or detect(*a, **k)
    ids = {task_name(s): range(N) for s in SKILLS}
    assert auto.evaluate("search", ids).examples == ev.evaluate("search", ids).examples
    assert auto.evaluate("search", ids).scores == ev.evaluate("search", ids).scores
    assert len(probes) == 1 and auto.lm._probed[1] >= 1


@pytest.mark.parametrize("max_length", [64, 12])  # 12: long prompts are cut to the last tokens
def test_vectorized_scoring_equals_lm_eval_on_gpt2(gpt2_zoo, max_length):
    """Another architecture (learned positions, tied head), odd batch edges, and context truncation."""
    from lm_eval.models.huggingface import HFLM

    from evomerge.evaluate import score_continuations

    model = AutoModelForCausalLM.from_pretrained(gpt2_zoo["base"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_path("base"))
    reference = HFLM(pretrained=model, tokenizer=tok, batch_size=5, max_length=max_length)
    requests = [((r["prompt"], r["target"]), tok.encode(r["prompt"]), tok.encode(r["target"]))
                for skill in SKILLS for r in rows(skill, "test")[:9]]
    expected = reference._loglikelihood_tokens(requests, disable_tqdm=True)
    got = score_continuations(model, [(c, t) for _, c, t in requests], max_length, 4, tok.pad_token_id)
    assert [g for _, g in got] == [g for _, g in expected]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in expected], abs=1e-4)
