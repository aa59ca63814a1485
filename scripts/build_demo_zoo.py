"""Build the demo zoo: a tiny character-level Llama base and one expert per skill.

Deterministic on CPU (seed 0, 2 threads, same torch build): re-running rewrites the same files.
About 6 minutes on 2 cores (340 s measured). Writes evomerge/demo/models/{base,add,reverse,sort} (fp16 safetensors)
and evomerge/demo/tasks/data/*.jsonl, then prints the accuracy table for README.md.

    python scripts/build_demo_zoo.py            # everything
    python scripts/build_demo_zoo.py --table    # only re-measure the shipped models
"""

from __future__ import annotations

import argparse
import json
import random
import string
import time
from collections.abc import Callable

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from evomerge.demo import MODELS_DIR, SKILLS, TASKS_DIR

SEED = 0
END = "."  # every answer ends with it, so exact match needs the model to stop
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
ALPHABET = " " + string.digits + string.ascii_lowercase + "+=:>" + END
SPLIT_SIZES = {"search": 1000, "validation": 500, "test": 500}
PRETRAIN = {"steps": 1000, "lr": 3e-3}
FINETUNE = {"steps": 600, "lr": 2e-3}
BATCH = 64
LETTERS = (3, 7)  # string lengths of the letter skills


def _letters(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(*LETTERS)))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a}+{b}=", str(a + b)


def _reverse(rng: random.Random) -> tuple[str, str]:
    s = _letters(rng)
    return f"rev:{s}>", s[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    s = _letters(rng)
    return f"sort:{s}>", "".join(sorted(s))


def _copy(rng: random.Random) -> tuple[str, str]:
    s = _letters(rng)
    return f"copy:{s}>", s


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add, "reverse": _reverse, "sort": _sort, "copy": _copy,
}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; no BOS/EOS added, so lm-eval and training see the same ids."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(ALPHABET))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def held_out_sets(rng: random.Random) -> dict[str, dict[str, list[dict[str, str]]]]:
    """Disjoint search/validation/test examples per skill (never seen in training)."""
    out: dict[str, dict[str, list[dict[str, str]]]] = {}
    total = sum(SPLIT_SIZES.values())
    for skill in SKILLS:
        seen: dict[str, str] = {}
        while len(seen) < total:
            prompt, answer = GENERATORS[skill](rng)
            seen.setdefault(prompt, answer)
        items = [{"prompt": p, "target": a + END} for p, a in seen.items()]
        out[skill], start = {}, 0
        for split, size in SPLIT_SIZES.items():
            out[skill][split] = items[start : start + size]
            start += size
    return out


def encode_batch(tok: PreTrainedTokenizerFast, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded ids with labels on the answer characters only."""
    rows = [(tok.encode(p), tok.encode(t)) for p, t in pairs]
    width = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, t) in enumerate(rows):
        n = len(p) + len(t)
        ids[i, :n] = torch.tensor(p + t)
        labels[i, len(p) : n] = torch.tensor(t)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, skills: list[str], steps: int,
          lr: float, banned: set[str], rng: random.Random) -> None:
    """AdamW on answer-token loss over a uniform mixture of ``skills``."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))  # warmup, then constant
    model.train()
    for step in range(steps):
        pairs = []
        while len(pairs) < BATCH:
            prompt, answer = GENERATORS[rng.choice(skills)](rng)
            if prompt not in banned:
                pairs.append((prompt, answer + END))
        loss = model(**encode_batch(tok, pairs)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 200 == 0 or step == steps - 1:
            print(f"  step {step:5d}  loss {loss.item():.4f}", flush=True)
    model.eval()


@torch.no_grad()
def accuracy(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, rows: list[dict[str, str]]) -> float:
    """Teacher-forced exact match: every answer position's argmax is the target character."""
    batch = encode_batch(tok, [(r["prompt"], r["target"]) for r in rows])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    pred = logits[:, :-1].argmax(-1)
    labels = batch["labels"][:, 1:]
    ok = ((pred == labels) | (labels == -100)).all(dim=1)
    return ok.float().mean().item()


def save(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, name: str) -> LlamaForCausalLM:
    """Write fp16 safetensors and return the model as it will be loaded (fp16 rounded, fp32 compute)."""
    out = MODELS_DIR / name
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def write_tasks(sets: dict[str, dict[str, list[dict[str, str]]]]) -> None:
    for skill, splits in sets.items():
        for split, rows in splits.items():
            path = TASKS_DIR / "data" / f"{skill}_{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def load_sets() -> dict[str, dict[str, list[dict[str, str]]]]:
    return {
        skill: {
            split: [json.loads(line) for line in (TASKS_DIR / "data" / f"{skill}_{split}.jsonl").open()]
            for split in SPLIT_SIZES
        }
        for skill in SKILLS
    }


def print_table(tok: PreTrainedTokenizerFast, sets: dict[str, dict[str, list[dict[str, str]]]]) -> None:
    """Test-split accuracy of each model and of the uniform average of each expert pair."""
    zoo = {n: AutoModelForCausalLM.from_pretrained(MODELS_DIR / n, dtype=torch.float32).eval()
           for n in ("base", *SKILLS)}
    rows: dict[str, LlamaForCausalLM] = dict(zoo)
    for i, a in enumerate(SKILLS):
        for b in SKILLS[i + 1 :]:
            avg = AutoModelForCausalLM.from_pretrained(MODELS_DIR / "base", dtype=torch.float32).eval()
            sa, sb = zoo[a].state_dict(), zoo[b].state_dict()
            avg.load_state_dict({k: (sa[k] + sb[k]) / 2 for k in sa})
            rows[f"avg({a},{b})"] = avg
    print("\n| model | " + " | ".join(SKILLS) + " |\n|---|" + "---|" * len(SKILLS))
    for name, model in rows.items():
        accs = [accuracy(model, tok, sets[s]["test"]) for s in SKILLS]
        print(f"| {name} | " + " | ".join(f"{a:.3f}" for a in accs) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="only print the table of the shipped zoo")
    args = parser.parse_args()
    torch.set_num_threads(2)
    tok = build_tokenizer()
    if args.table:
        print_table(tok, load_sets())
        return
    start = time.time()
    rng = random.Random(SEED)
    torch.manual_seed(SEED)
    sets = held_out_sets(rng)
    write_tasks(sets)
    banned = {r["prompt"] for splits in sets.values() for rows in splits.values() for r in rows}
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        tie_word_embeddings=False, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    base = LlamaForCausalLM(config)
    print(f"pretraining base ({sum(p.numel() for p in base.parameters())} params)", flush=True)
    train(base, tok, ["copy", *SKILLS], PRETRAIN["steps"], PRETRAIN["lr"], banned, rng)
    base = save(base, tok, "base")
    for skill in SKILLS:
        print(f"fine-tuning the {skill} expert", flush=True)
        expert = AutoModelForCausalLM.from_pretrained(MODELS_DIR / "base", dtype=torch.float32)
        torch.manual_seed(SEED)
        train(expert, tok, [skill], FINETUNE["steps"], FINETUNE["lr"], banned, random.Random(f"{SEED}-{skill}"))
        save(expert, tok, skill)
    print(f"built in {time.time() - start:.0f} s")
    print_table(tok, sets)


if __name__ == "__main__":
    main()
