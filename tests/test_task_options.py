"""lm-eval task options per task (num_fewshot, system_instruction, apply_chat_template, gen_kwargs), checked on
the contexts the evaluator builds, and bad options refused before compute."""

import json
import shutil

import pytest
import torch
import yaml
from helpers import search_refused
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.demo import TASKS_DIR, model_path
from evomerge.errors import SpecError
from evomerge.evaluate import Evaluator, check_tasks
from evomerge.spec import TaskSpec

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
IDS = [3, 4, 5]


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(model_path("add"), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat") / "add"
    shutil.copytree(model_path("add"), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return AutoTokenizer.from_pretrained(folder), folder


def evaluator(model, tok, **options):
    task = TaskSpec(name="demo_add", splits={"search": "search[0:20]", "validation": "validation[0:5]",
                                             "test": "test[0:5]"}, **options)
    return Evaluator(model, tok, [task], [TASKS_DIR], batch_size=8)


def contexts(ev, role="search", ids=IDS):
    """The context strings lm-eval scores for those documents (as the next evaluate call hands them out)."""
    built = ev._loaded[role]["tasks"][ev.task_key("demo_add", role)]
    built.build_all_requests(samples=ids)
    return [instance.args[0] for instance in built.instances]


def rows(split):
    return [json.loads(line) for line in (TASKS_DIR / "data" / f"add_{split}.jsonl").open()]


def test_defaults_are_zero_shot_plain_prompts(model):
    ev = evaluator(model, AutoTokenizer.from_pretrained(model_path("add")))
    assert contexts(ev) == [rows("search")[i]["prompt"] for i in IDS]


def test_num_fewshot_same_examples_for_every_candidate(model):
    tok = AutoTokenizer.from_pretrained(model_path("add"))
    ev = evaluator(model, tok, num_fewshot=2)
    first = contexts(ev)
    docs = rows("search")  # examples come from the whole split, as in lm-eval, not just the doc range
    for i, ctx in zip(IDS, first, strict=True):
        shots, _, prompt = ctx.rpartition("\n\n")
        assert prompt == docs[i]["prompt"]
        examples = shots.split("\n\n")
        assert len(examples) == 2
        pool = {d["prompt"] + d["target"] for d in docs}
        assert all(e in pool for e in examples)
        assert docs[i]["prompt"] + docs[i]["target"] not in examples  # a document is not its own example
    scored = ev.evaluate("search", {"demo_add": IDS})  # a candidate scored in between changes nothing
    assert sorted(scored.examples["demo_add"]) == IDS
    assert contexts(ev) == first
    assert contexts(evaluator(model, tok, num_fewshot=2)) == first  # another worker draws the same examples


def test_system_instruction_comes_first(model):
    ev = evaluator(model, AutoTokenizer.from_pretrained(model_path("add")), system_instruction="Add the numbers.")
    # lm-eval 0.4.13 renders the system message as it is, with no delimiter before the first turn
    assert contexts(ev) == [f"Add the numbers.{rows('search')[i]['prompt']}" for i in IDS]


def test_chat_template_wraps_context(model, chat_tok):
    tok, _ = chat_tok
    ev = evaluator(model, tok, apply_chat_template=True, system_instruction="Sum.")
    assert contexts(ev, "test") == [f"<|system|>Sum.</s><|user|>{rows('test')[i]['prompt']}</s><|assistant|>"
                                    for i in IDS]
    multi = contexts(evaluator(model, tok, apply_chat_template=True, num_fewshot=1), "test")
    single = contexts(evaluator(model, tok, apply_chat_template=True, fewshot_as_multiturn=False,
                                num_fewshot=1), "test")
    assert all(c.count("<|user|>") == 2 and c.count("<|assistant|>") == 2 for c in multi)  # one turn per shot
    assert all(c.count("<|user|>") == 1 and c.endswith("<|assistant|>") for c in single)


def test_chat_template_needs_one(model, chat_tok):
    plain = AutoTokenizer.from_pretrained(model_path("add"))
    message = "task demo_add sets apply_chat_template, but the model's tokenizer has no chat template"
    with pytest.raises(SpecError, match=message):
        evaluator(model, plain, apply_chat_template=True)
    with pytest.raises(SpecError, match=message):
        check_tasks([TaskSpec(name="demo_add", apply_chat_template=True)], [TASKS_DIR], model_path("add"))
    check_tasks([TaskSpec(name="demo_add", apply_chat_template=True)], [TASKS_DIR], chat_tok[1])


def test_gen_kwargs_reach_generate_until_requests(model, tmp_path):
    shutil.copytree(TASKS_DIR, tmp_path, dirs_exist_ok=True)
    config = yaml.safe_load((TASKS_DIR / "demo_add.yaml").read_text())
    gen = {**config, "task": "gen_add", "output_type": "generate_until", "metric_list": [{"metric": "exact_match"}],
           "generation_kwargs": {"until": ["."], "do_sample": False}}
    (tmp_path / "gen_add.yaml").write_text(yaml.safe_dump(gen))
    task = TaskSpec(name="gen_add", metric="exact_match", splits={"search": "search[0:4]", "validation":
                    "validation[0:4]", "test": "test[0:4]"}, gen_kwargs={"max_gen_toks": 7, "temperature": 0})
    ev = Evaluator(model, AutoTokenizer.from_pretrained(model_path("add")), [task], [tmp_path], batch_size=4)
    built = ev._loaded["search"]["tasks"][ev.task_key("gen_add", "search")]
    built.build_all_requests(samples=[0, 1])
    kwargs = [instance.args[1] for instance in built.instances]
    assert kwargs == [{"until": ["."], "do_sample": False, "max_gen_toks": 7, "temperature": 0.0}] * 2


SPEC = {
    "base_model": "demo:base",
    "models": ["demo:add", "demo:reverse"],
    "space": {"methods": ["linear"], "granularity": "global", "parameters": {"weight": {"low": 0.0, "high": 1.0}}},
    "evaluation": {"include_paths": ["demo"], "tasks": [{"name": "demo_add"}], "search_examples": 40,
                   "screen_examples": 15, "top_k": 2},
    "sampler": "random",
    "seed": 3,
}


@pytest.mark.parametrize(("options", "message"), [
    ({"num_fewshot": -1}, "num_fewshot"),
    ({"num_fewshot": 1.5}, "num_fewshot"),
    ({"apply_chat_template": "yes"}, "apply_chat_template"),
    ({"fewshot_as_multiturn": True}, "fewshot_as_multiturn needs apply_chat_template: true"),
    ({"gen_kwargs": {"until": [".", "\n"]}}, "gen_kwargs"),
    ({"gen_kwargs": {"max_gen_toks": 5}},
     "task demo_add: gen_kwargs apply to generate_until tasks only; it is loglikelihood"),
    ({"apply_chat_template": True}, "task demo_add sets apply_chat_template, but the model's tokenizer has no chat"),
])
def test_bad_options_fail_before_compute(options, message, tmp_path, capsys):
    doc = json.loads(json.dumps(SPEC))
    doc["evaluation"]["tasks"][0].update(options)
    search_refused(doc, tmp_path, capsys, message)


def test_a_tasks_own_fewshot_samples_are_kept(model, tmp_path):
    """A YAML with hard-coded fewshot_config.samples (as gsm8k_cot has) and no few-shot split keeps them: a
    split handed to lm-eval would replace them with documents."""
    shutil.copytree(TASKS_DIR, tmp_path, dirs_exist_ok=True)
    config = yaml.safe_load((TASKS_DIR / "demo_add.yaml").read_text())
    fixed = {**config, "task": "fixed_add", "num_fewshot": 1,
             "fewshot_config": {"sampler": "first_n", "samples": [{"prompt": "1+1=", "target": "2."}]}}
    (tmp_path / "fixed_add.yaml").write_text(yaml.safe_dump(fixed))
    task = TaskSpec(name="fixed_add", splits={"search": "search[0:4]", "validation": "validation[0:4]",
                                              "test": "test[0:4]"})
    ev = Evaluator(model, AutoTokenizer.from_pretrained(model_path("add")), [task], [tmp_path], batch_size=4)
    built = ev._loaded["search"]["tasks"][ev.task_key("fixed_add", "search")]
    built.build_all_requests(samples=[0, 1])
    for instance, row in zip(built.instances, rows("search")[:2], strict=True):
        assert instance.args[0].startswith("1+1=2.") and instance.args[0].endswith(row["prompt"])
