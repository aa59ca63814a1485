"""Benchmark `evomerge merge` against `mergekit-yaml` on random Llamas in bf16.

Two models: ``llama-322m`` (20 layers, hidden 1024, vocab 32000) and ``large-vocab`` (4 layers, hidden
1024, vocab 128256: embeddings and head dominate). For each, builds the base and three perturbed
"fine-tunes" once (cached in /tmp/evomerge-bench-merge/NAME), then runs ties and task_arithmetic merges of
the three with both tools, each in a fresh process, and prints wall time, peak RSS and the ratios
(mergekit / evomerge: above 1 means evomerge is faster or smaller). ``--models smollm2-135m`` merges the real
zoo instead (scripts/build_real_zoo.py: SmolLM2-135M and its two fine-tuned experts, bf16, tied embeddings).

    python scripts/bench_merge.py [--models llama-322m large-vocab smollm2-135m] [--repeat 2] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import build_real_zoo as real_zoo  # this folder
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from evomerge.recipes import Recipe

COMMON = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=16,
              tie_word_embeddings=False)
CONFIGS = {"llama-322m": dict(COMMON, vocab_size=32000, num_hidden_layers=20),
           "large-vocab": dict(COMMON, vocab_size=128256, num_hidden_layers=4)}
REAL = "smollm2-135m"  # the real zoo's base and experts, where scripts/build_real_zoo.py writes them
MEASURE = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
           "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode; "
           "dt = time.perf_counter() - t; "
           "print(rc, dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")


def build_models(cache: Path, config: dict) -> dict[str, Path]:
    """The base (random init) and three fine-tunes (base + small noise), bf16 safetensors."""
    names = ["base", "ft1", "ft2", "ft3"]
    paths = {n: cache / n for n in names}
    if all((p / "model.safetensors").exists() for p in paths.values()):
        return paths
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16)
    print(f"building a {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M-parameter Llama in {cache}")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    for i, name in enumerate(names):
        out = paths[name]
        out.mkdir(parents=True, exist_ok=True)
        model.config.architectures = ["LlamaForCausalLM"]
        model.config.save_pretrained(out)
        gen = torch.Generator().manual_seed(i)
        tensors = state if name == "base" else {
            k: (v.float() + 0.01 * torch.randn(v.shape, generator=gen)).to(torch.bfloat16) for k, v in state.items()}
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return paths


def real_models() -> dict[str, Path]:
    paths = {name: real_zoo.DEFAULT_OUT / name for name in ("base", *real_zoo.EXPERTS)}
    if not all((p / "model.safetensors").exists() for p in paths.values()):
        raise SystemExit(f"no real zoo in {real_zoo.DEFAULT_OUT}: run scripts/build_real_zoo.py first")
    return paths


def recipe(method: str, paths: dict[str, Path]) -> Recipe:
    """Every model but the base, weight 1 (density 0.5 for TIES), in bf16."""
    params = {"weight": 1.0, **({"density": 0.5} if method == "ties" else {})}
    return Recipe(merge_method=method, base_model=str(paths["base"]), dtype="bfloat16",
                  models=[{"model": str(p), "parameters": params} for name, p in paths.items() if name != "base"])


def measure(cmd: list[str]) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, check=True)
    rc, seconds, rss_mb = out.stdout.split()
    if rc != "0":
        raise RuntimeError(f"{cmd[0]} failed: {out.stderr[-2000:]}")
    return float(seconds), float(rss_mb)


def difference(ours: Path, theirs: Path) -> tuple[int, int, float]:
    """How many entries of the two outputs differ (of how many), and the largest absolute difference."""
    a, b = ({k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
            for folder in (ours, theirs))
    if a.keys() != b.keys():
        raise RuntimeError(f"the outputs hold different tensors: {sorted(a.keys() ^ b.keys())[:5]}")
    differ = total = 0
    largest = 0.0
    for name, x in a.items():
        delta = (x.float() - b[name].float()).abs()
        differ += int((delta > 0).sum())
        total += x.numel()
        largest = max(largest, float(delta.max()) if delta.numel() else 0.0)
    return differ, total, largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=[*CONFIGS, REAL], default=list(CONFIGS))
    parser.add_argument("--methods", nargs="+", default=["ties", "task_arithmetic"])
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool and method (best time kept)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "evomerge-bench-merge")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models:
        paths = real_models() if model == REAL else build_models(args.cache / model, CONFIGS[model])
        with tempfile.TemporaryDirectory(dir=args.cache) as work:
            work = Path(work)
            for method in args.methods:
                rec = recipe(method, paths)
                (work / "ours.yaml").write_text(rec.to_yaml())
                (work / "theirs.yaml").write_text(rec.to_mergekit_yaml())
                tools = {  # tool: (command, output folder)
                    "evomerge": (["evomerge", "merge", str(work / "ours.yaml"), "--out", str(work / "o"), "--force"],
                                 work / "o"),
                    "mergekit": (["mergekit-yaml", str(work / "theirs.yaml"), str(work / "t"), "--allow-crimes"],
                                 work / "t"),
                }
                result = {}
                for tool, (cmd, out) in tools.items():
                    runs = []
                    for _ in range(args.repeat):
                        shutil.rmtree(out, ignore_errors=True)
                        runs.append(measure(cmd))
                    result[tool] = (min(r[0] for r in runs), max(r[1] for r in runs))
                rows.append((model, method, result, difference(work / "o", work / "t")))
                shutil.rmtree(work / "o")
                shutil.rmtree(work / "t")
    print("\n| model | method | evomerge s | mergekit s | speed-up | evomerge peak RSS MB | mergekit peak RSS MB "
          "| RSS ratio | entries that differ |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model, method, r, (differ, total, largest) in rows:
        (es, em), (ms, mm) = r["evomerge"], r["mergekit"]
        print(f"| {model} | {method} | {es:.1f} | {ms:.1f} | {ms / es:.2f}x | {em:.0f} | {mm:.0f} | {mm / em:.2f}x "
              f"| {differ} of {total} (largest {largest:.2g}) |")
    print(json.dumps({"torch_threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%d")}))


if __name__ == "__main__":
    main()
