"""The shipped demo zoo holds the claims the demo rests on (teacher-forced greedy match on test)."""

import json
from itertools import combinations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.demo import MODEL_NAMES, MODELS_DIR, SKILLS, TASKS_DIR, model_path


@torch.no_grad()
def accuracy(model, tok, rows) -> float:
    """Share of examples whose every answer character is the argmax after its prefix (one padded batch)."""
    pairs = [(tok.encode(r["prompt"]), tok.encode(r["target"])) for r in rows]
    width = max(len(p) + len(t) for p, t in pairs)
    ids = torch.full((len(pairs), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, (p, t) in enumerate(pairs):
        ids[i, : len(p) + len(t)] = torch.tensor(p + t)
        mask[i, : len(p) + len(t)] = 1
    pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
    ok = [torch.equal(pred[i, len(p) - 1 : len(p) + len(t) - 1], torch.tensor(t)) for i, (p, t) in enumerate(pairs)]
    return sum(ok) / len(ok)


@pytest.fixture(scope="module")
def table():
    tok = AutoTokenizer.from_pretrained(model_path("base"))
    tests = {s: [json.loads(line) for line in (TASKS_DIR / "data" / f"{s}_test.jsonl").open()][:250] for s in SKILLS}
    states = {n: AutoModelForCausalLM.from_pretrained(model_path(n), dtype=torch.float32).state_dict()
              for n in MODEL_NAMES}
    model = AutoModelForCausalLM.from_pretrained(model_path("base"), dtype=torch.float32).eval()
    out = {}
    pairs = {f"{a}+{b}": {k: (states[a][k] + states[b][k]) / 2 for k in states[a]} for a, b in combinations(SKILLS, 2)}
    for name, state in {**states, **pairs}.items():
        model.load_state_dict(state)
        out[name] = {s: accuracy(model, tok, tests[s]) for s in SKILLS}
    return out


def test_zoo_is_small_and_loads_offline():
    size = sum(f.stat().st_size for f in MODELS_DIR.rglob("*") if f.is_file())
    assert size < 10 * 1024**2
    for split in ("search", "validation", "test"):
        prompts = [{json.loads(line)["prompt"] for line in (TASKS_DIR / "data" / f"{s}_{split}.jsonl").open()}
                   for s in SKILLS]
        assert all(prompts)
    splits = {sp: {json.loads(line)["prompt"] for line in (TASKS_DIR / "data" / f"add_{sp}.jsonl").open()}
              for sp in ("search", "validation", "test")}
    assert not (splits["search"] & splits["validation"]) and not (splits["validation"] & splits["test"])
    assert not (splits["search"] & splits["test"])


@pytest.mark.parametrize("skill", SKILLS)
def test_expert_masters_its_skill_and_forgets_another(table, skill):
    assert table[skill][skill] >= 0.90
    others = [s for s in SKILLS if s != skill]
    assert min(table[skill][o] - table["base"][o] for o in others) <= -0.05


@pytest.mark.parametrize("pair", [f"{a}+{b}" for a, b in combinations(SKILLS, 2)])
def test_uniform_merge_beats_both_parents(table, pair):
    a, b = pair.split("+")
    mean = {name: (table[name][a] + table[name][b]) / 2 for name in (a, b, pair)}
    assert mean[pair] > mean[a] and mean[pair] > mean[b], mean
