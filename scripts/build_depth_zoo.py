"""Build the depth zoo: two experts of the demo base whose skills sit at the same depth, for the data-flow demo.

Each expert is the demo base (``evomerge/demo/models/base``) fine-tuned on one skill (add, sort) with only
its blocks ``--blocks`` trainable (default 0 and 1; embeddings, the other blocks, final norm and head frozen),
so both experts differ from the base, and from each other, only in the same blocks. A per-layer weight merge
must mix those blocks, where the two skills interfere; a layer path can run one expert's blocks after the
other's (``A0 A1 B0 B1 base2 base3``), which no weight merge of same-position blocks expresses. Searched by
``search_spaces/depth_zoo_ps.yaml`` (weights, then a path) and ``depth_zoo_dfs.yaml`` (a path alone) over the
demo's add and sort tasks.

Such a path only works if each expert's blocks leave other inputs alone and tolerate a later place in the
stack, which plain fine-tuning does not give (``--no-replay --prefix-prob 0``: the path loses, see README).
So by default each expert is trained for both, on purpose: ``--replay``: half of each batch is the base's
other pretraining skills, trained to keep the base's predictions there (KL to the base at the answer
positions); ``--prefix-prob 0.5``: half of the batches run behind frozen copies of the base's blocks
``--blocks`` (``base0 base1 A0 A1 base2 base3``), so the trained blocks also see a stream that is already
that deep.

Deterministic on CPU (seed 0, 1 thread, same torch build); about 10 minutes on one core of a busy 2-core
machine (582 s measured; 242 s for ``--no-replay --prefix-prob 0``). Writes OUT/{add,sort} (fp16 safetensors;
OUT defaults to ~/.cache/evomerge/depth_zoo, outside the package and git, where the depth_zoo specs look),
then prints a test-accuracy table of the base, the experts, their average, their task-arithmetic sum and a
few hand-made paths.

    python scripts/build_depth_zoo.py [--out DIR] [--blocks 0 1] [--[no-]replay] [--prefix-prob 0.5] [--table]
"""

from __future__ import annotations

import argparse
import copy
import random
import tempfile
import time
from pathlib import Path

import torch
from build_demo_zoo import (
    BATCH,
    END,
    FINETUNE,
    GENERATORS,
    SEED,
    accuracy,
    build_tokenizer,
    encode_batch,
    load_sets,
    train,  # this folder
)
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from evomerge.dataflow import path_to_folder
from evomerge.demo import MODELS_DIR
from evomerge.recipes import PathRecipe

SKILLS = ("add", "sort")  # the base is weak at both (README's zoo table); reverse it already solves
PROBE_PATHS = ("A0 A1 B0 B1 base2 base3", "B0 B1 A0 A1 base2 base3", "A0 B0 A1 B1 base2 base3",
               "B0 A0 B1 A1 base2 base3", "A0 A1 B1 base2 base3", "A0 B0 B1 base2 base3",
               "base0 base1 A0 A1 base2 base3", "base0 base1 B0 B1 base2 base3")
DEFAULT_OUT = Path("~/.cache/evomerge/depth_zoo").expanduser()


def load(folder: Path) -> LlamaForCausalLM:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def train_with_replay(model: LlamaForCausalLM, teacher: LlamaForCausalLM, skill: str, banned: set[str],
                      rng: random.Random) -> None:
    """AdamW on half-skill, half-replay batches: answer-token loss on ``skill`` examples, and on examples of the
    base's other pretraining skills the KL divergence from the base's (``teacher``'s) predictions at the answer
    positions, so the expert keeps the base's behaviour off its own skill."""
    tok = build_tokenizer()
    others = [s for s in ("copy", "add", "reverse", "sort") if s != skill]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=FINETUNE["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    model.train()
    for step in range(FINETUNE["steps"]):
        pairs: list[tuple[str, str]] = []
        while len(pairs) < BATCH:
            prompt, answer = GENERATORS[skill if len(pairs) < BATCH // 2 else rng.choice(others)](rng)
            if prompt not in banned:
                pairs.append((prompt, answer + END))
        batch = encode_batch(tok, pairs)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        with torch.no_grad():
            target = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        own, replay = slice(0, BATCH // 2), slice(BATCH // 2, BATCH)
        ce = torch.nn.functional.cross_entropy(logits[own].flatten(0, 1), labels[own].flatten(), ignore_index=-100)
        mask = labels[replay] != -100
        kl = torch.nn.functional.kl_div(logits[replay][mask].log_softmax(-1), target[replay][mask].log_softmax(-1),
                                        log_target=True, reduction="batchmean")
        loss = ce + kl
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 200 == 0 or step == FINETUNE["steps"] - 1:
            print(f"  step {step:5d}  skill loss {ce.item():.4f}  replay KL {kl.item():.4f}", flush=True)
    model.eval()


def finetune_blocks(skill: str, blocks: list[int], out: Path, banned: set[str], prefix_prob: float,
                    replay: bool) -> None:
    """The base fine-tuned on ``skill`` with only ``blocks`` trainable, written as fp16 to OUT/skill.

    With ``prefix_prob`` > 0, each training batch runs, with that probability, after frozen copies of the
    base's blocks ``blocks`` (the path ``base0 base1 A0 A1 base2 base3`` for blocks 0-1), so the trained
    blocks also work on a stream that is already that deep: they tolerate a place later in a layer path.
    With ``replay``, half of each batch keeps the base's behaviour on its other skills (``train_with_replay``)."""
    tok = build_tokenizer()
    model = load(MODELS_DIR / "base")
    for name, param in model.named_parameters():
        param.requires_grad = any(name.startswith(f"model.layers.{b}.") for b in blocks)
    own = model.model.layers
    prefix = [copy.deepcopy(own[b]).requires_grad_(False) for b in blocks]
    first = min(blocks)
    prefixed = torch.nn.ModuleList([*own[:first], *prefix, *own[first:]])
    coin = random.Random(f"{SEED}-depth-prefix-{skill}")

    def pick_layers(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        deep = module.training and coin.random() < prefix_prob
        module.layers = prefixed if deep else own
        module.config.num_hidden_layers = len(module.layers)

    hook = model.model.register_forward_pre_hook(pick_layers, with_kwargs=True)
    model.config.use_cache = False  # the prefix copies share their blocks' attention layer index
    torch.manual_seed(SEED)
    rng = random.Random(f"{SEED}-depth-{skill}")
    if replay:
        train_with_replay(model, load(MODELS_DIR / "base"), skill, banned, rng)
    else:
        train(model, tok, [skill], FINETUNE["steps"], FINETUNE["lr"], banned, rng)
    hook.remove()
    model.model.layers = own
    model.config.num_hidden_layers = len(own)
    model.config.use_cache = True
    model.to(torch.float16).save_pretrained(out / skill, safe_serialization=True)
    tok.save_pretrained(out / skill)


def path_model(outer: str, steps: list[tuple[str, int]]) -> LlamaForCausalLM:
    """The layer path ``steps`` ((model folder, block), in order; outer tensors from ``outer``), written by
    evomerge's own path writer to a temporary folder and loaded from there."""
    recipe = PathRecipe(outer=outer, path=[{"model": m, "layer": i} for m, i in steps])
    with tempfile.TemporaryDirectory() as tmp:
        path_to_folder(recipe, Path(tmp) / "path")
        return load(Path(tmp) / "path")


def averaged(models: list[LlamaForCausalLM]) -> LlamaForCausalLM:
    out = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    out.load_state_dict({k: sum(s[k] for s in states) / len(states) for k in states[0]})
    return out.eval()


def task_arithmetic(base: LlamaForCausalLM, models: list[LlamaForCausalLM]) -> LlamaForCausalLM:
    out = copy.deepcopy(base)
    sb, states = base.state_dict(), [m.state_dict() for m in models]
    out.load_state_dict({k: sb[k] + sum(s[k] - sb[k] for s in states) for k in sb})
    return out.eval()


def print_table(out: Path) -> None:
    tok, sets = build_tokenizer(), load_sets()
    base = load(MODELS_DIR / "base")
    a, b = (load(out / s) for s in SKILLS)
    ref = {"A": str(out / SKILLS[0]), "B": str(out / SKILLS[1]), "base": str(MODELS_DIR / "base")}
    rows = {
        "base": base, f"A = {SKILLS[0]}": a, f"B = {SKILLS[1]}": b,
        f"avg({SKILLS[0]},{SKILLS[1]})": averaged([a, b]),
        f"task_arithmetic({SKILLS[0]},{SKILLS[1]}) (lambda 1)": task_arithmetic(base, [a, b]),
    }
    for path in PROBE_PATHS:
        steps = [(ref[name.rstrip("0123456789")], int(name[-1])) for name in path.split()]
        rows[f"path {path}"] = path_model(ref["base"], steps)
    print("\n| model | " + " | ".join(SKILLS) + " | mean |\n|---|" + "---|" * (len(SKILLS) + 1))
    for name, model in rows.items():
        accs = [accuracy(model, tok, sets[s]["test"]) for s in SKILLS]
        print(f"| {name} | " + " | ".join(f"{x:.3f}" for x in accs) + f" | {sum(accs) / len(accs):.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 1], help="the experts' trainable blocks")
    parser.add_argument("--prefix-prob", type=float, default=0.5,
                        help="probability that a training batch runs after frozen copies of the base's trained blocks")
    parser.add_argument("--replay", action=argparse.BooleanOptionalAction, default=True,
                        help="half of each batch keeps the base's behaviour on its other skills (KL to the base)")
    parser.add_argument("--table", action="store_true", help="only print the table of the built zoo")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = args.out.expanduser()
    if not args.table:
        start = time.time()
        sets = load_sets()
        banned = {r["prompt"] for splits in sets.values() for rows in splits.values() for r in rows}
        for skill in SKILLS:
            print(f"fine-tuning the {skill} expert, blocks {args.blocks} only", flush=True)
            finetune_blocks(skill, args.blocks, out, banned, args.prefix_prob, args.replay)
        print(f"built in {time.time() - start:.0f} s")
    print_table(out)


if __name__ == "__main__":
    main()
