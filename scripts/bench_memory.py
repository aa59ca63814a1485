"""Benchmark a live worker's memory and per-candidate merge time, per input placement, against the float32 copies
of the baseline revision (today's code before the memory redesign), side by side in one run.

Models: random bf16 Llamas built here with the demo's character tokenizer (so each can also be searched):
``165m`` (13 blocks, hidden 1024) and ``1.1b`` (25 blocks, hidden 2048, 4 KV heads: TinyLlama's block shape),
each a base and five experts (base + small noise), cached in /tmp/evomerge-bench-memory; ``real`` is the
SmolLM2-135M base (scripts/build_real_zoo.py's conversion of the GGUF on PyPI: 49,152-token BPE vocabulary,
tied embeddings) and five noisy experts of it; ``demo`` is the demo zoo's base (0.86M parameters) and five noisy
copies. Each cell runs in a fresh process on the CPU: it loads the live
model (bf16), builds the merger over 2 / 3 / 5 experts with one placement (``host``: memory-mapped files;
``device``: the inputs read into memory as stored; ``baseline``: the baseline revision's merger, float32 base,
weights and task vectors), merges once to warm up, then ``--repeat`` times per method (linear, task_arithmetic,
ties) and reports the best time. A thread samples the process's RssAnon and RssFile (/proc/self/status) every
2 ms: peak anonymous memory (what the process owns) and peak file-backed memory (mapped pages, shared with the
page cache and every other process that maps the files). A baseline cell that cannot fit in this machine's
memory is not run (its float32 footprint, ~(2N+1) x 2 x the bf16 model, is printed instead).

``--search`` runs the issue's acceptance search: a 1.1B base and three experts, two demo tasks on a few
documents, ``--budget 3``, in-process on the CPU, and reports the search process's peak anonymous memory
against 2 x the live model + 1.5 GB. ``--ray`` runs a search with two Ray workers on this node over the 165m
zoo (run it inside ../shared/offline) and reports each worker's peaks and the node's used memory and page
cache. The projection for 7B and 70B is by formula.

    python scripts/bench_memory.py [--models demo 165m real 1.1b] [--experts 2 3 5] [--repeat 3]
        [--baseline REV] [--search] [--ray] [--cache DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "b84705d"  # the last commit whose LiveMerger held float32 copies
CONFIGS = {
    "165m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=13, num_attention_heads=16,
                 num_key_value_heads=16),
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=25, num_attention_heads=32,
                 num_key_value_heads=4),
}
EXPERTS = 5
METHODS = ("linear", "task_arithmetic", "ties")
GB = 1e9


# ---- models ----------------------------------------------------------------------------------------------------

def write_family(cache: Path, base_state: dict[str, torch.Tensor], config: dict, side: Path) -> dict[str, Path]:
    """The base and EXPERTS noisy copies (0.01 x randn added in float32, rounded to bf16), with ``side``'s
    tokenizer files; written once (a folder appears complete or not at all)."""
    from safetensors.torch import save_file

    names = ["base", *(f"ft{i}" for i in range(1, EXPERTS + 1))]
    paths = {n: cache / n for n in names}
    for i, name in enumerate(names):
        if (paths[name] / "model.safetensors").exists():
            continue
        tmp = cache / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (side / f).exists():
                shutil.copy(side / f, tmp / f)
        gen = torch.Generator().manual_seed(i)
        tensors = base_state if name == "base" else {
            k: (v.float() + 0.01 * torch.randn(v.shape, generator=gen)).to(v.dtype) for k, v in base_state.items()}
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        del tensors
        tmp.rename(paths[name])
    return paths


def random_family(cache: Path, size: str) -> dict[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.demo import model_path

    folder = cache / size
    if all((folder / n / "model.safetensors").exists() for n in ["base", *(f"ft{i}" for i in range(1, 6))]):
        return {n: folder / n for n in ["base", *(f"ft{i}" for i in range(1, EXPERTS + 1))]}
    demo = model_path("base")
    vocab = json.loads((demo / "config.json").read_text())["vocab_size"]
    config = LlamaConfig(vocab_size=vocab, tie_word_embeddings=False, max_position_embeddings=256,
                         **CONFIGS[size])
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "bfloat16"
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    print(f"building a {sum(s.numel() for s in shapes.values()) / 1e9:.2f}B-parameter Llama family in {folder}",
          file=sys.stderr)
    state = {k: (torch.ones(s) if k.endswith("norm.weight") else 0.02 * torch.randn(s, generator=gen))
             .to(torch.bfloat16) for k, s in shapes.items()}
    return write_family(folder, state, config.to_dict(), demo)


def copies_family(folder: Path, source: Path) -> dict[str, Path]:
    """``source`` (a model folder) as the base and EXPERTS noisy copies of it."""
    from safetensors.torch import load_file

    return write_family(folder, load_file(source / "model.safetensors"),
                        json.loads((source / "config.json").read_text()), source)


def real_family(cache: Path) -> dict[str, Path]:
    import build_real_zoo as real_zoo  # this folder

    source = cache / "real" / "source"
    if not (source / "model.safetensors").exists():
        real_zoo.convert_base(source)
    return copies_family(cache / "real", source)


def family(cache: Path, name: str) -> dict[str, Path]:
    from evomerge.demo import model_path

    if name == "demo":
        return copies_family(cache / "demo", model_path("base"))
    return real_family(cache) if name == "real" else random_family(cache, name)


# ---- one cell, in its own process ------------------------------------------------------------------------------

class Peaks:
    """Samples this process's RssAnon and RssFile every 2 ms until stopped; keeps the largest of each."""

    def __init__(self) -> None:
        self.anon = self.file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            anon, file = status_kb(os.getpid())
            self.anon, self.file = max(self.anon, anon), max(self.file, file)
            time.sleep(0.002)

    def stop(self) -> tuple[float, float]:
        self._stop.set()
        self._thread.join()
        return self.anon * 1024 / GB, self.file * 1024 / GB


def status_kb(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile) of a process, in kB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["RssAnon"].split()[0]), int(fields["RssFile"].split()[0])


def cell(args: dict) -> dict:
    """Load the live model, build the merger with the cell's placement, merge each method: peaks and seconds."""
    from transformers import AutoModelForCausalLM

    from evomerge.merge import LiveMerger
    from evomerge.recipes import Recipe

    torch.set_num_threads(os.cpu_count() or 1)
    peaks = Peaks()
    model = AutoModelForCausalLM.from_pretrained(args["base"], dtype=torch.bfloat16).eval()
    live_gb = sum(p.nbytes for p in model.parameters()) / GB
    kwargs = {} if args["placement"] == "baseline" else {"inputs_on": args["placement"]}
    start = time.perf_counter()
    merger = LiveMerger(model, args["base"], args["models"], **kwargs)
    build_s = time.perf_counter() - start
    seconds = {}
    for method in METHODS:
        params = {"weight": 1.0 / len(args["models"]), **({"density": 0.5} if method == "ties" else {})}
        recipe = Recipe(merge_method=method, base_model=args["base"], dtype="bfloat16",
                        models=[{"model": m, "parameters": params} for m in args["models"]])
        times = []
        for _ in range(args["repeat"] + 1):
            start = time.perf_counter()
            merger.apply(recipe)
            times.append(time.perf_counter() - start)
        seconds[method] = min(times[1:])
    anon, file = peaks.stop()
    return {"live_gb": live_gb, "anon_gb": anon, "file_gb": file, "build_s": build_s, **seconds}


def baseline_tree(rev: str) -> Path:
    """The baseline revision's package in a temporary folder (with this tree's compiled top-k, same source)."""
    out = Path(tempfile.mkdtemp(prefix="evomerge-baseline-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "evomerge"], capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(out, filter="data")
    for built in (ROOT / "evomerge").glob("_topk*.so"):
        shutil.copy(built, out / "evomerge" / built.name)
    return out


def run_cell(args: dict, pythonpath: Path | None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(pythonpath)) if pythonpath else None
    out = subprocess.run([sys.executable, __file__, "--cell", json.dumps(args)], capture_output=True, text=True,
                         env=env, cwd=pythonpath or ROOT)
    if out.returncode:
        raise RuntimeError(f"cell {args['placement']} failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def host_memory() -> float:
    from evomerge.placement import free_bytes

    return free_bytes(torch.device("cpu")) / GB


# ---- the searches ----------------------------------------------------------------------------------------------

def search_spec(paths: dict[str, Path], experts: int, examples: int, folder: Path) -> Path:
    """A TIES search over ``experts`` experts on ``examples`` documents of each role of two demo tasks."""
    splits = {"search": "search", "validation": f"validation[:{examples}]", "test": f"test[:{examples}]"}
    spec = {"base_model": str(paths["base"]), "models": [str(paths[f"ft{i}"]) for i in range(1, experts + 1)],
            "dtype": "bfloat16", "device": "cpu", "sampler": "random", "seed": 0,
            "space": {"methods": ["ties"], "granularity": "global"},
            "evaluation": {"include_paths": ["demo"], "tasks": [{"name": name, "splits": splits}
                                                                 for name in ("demo_add", "demo_reverse")],
                           "search_examples": examples, "screen_examples": None, "top_k": 1, "batch_size": 8}}
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


Peak = tuple[float, float]  # (anonymous, file-backed) GB


def watch(cmd: list[str], pids: Callable[[int], list[int]]) -> tuple[int, dict[int, Peak], float, float, float]:
    """Run ``cmd``; sample RssAnon/RssFile of the processes ``pids()`` names, and the node's used memory
    (MemTotal - MemAvailable) and page cache, every 20 ms. Returns rc, per-pid peaks (GB), node peaks and time."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, Peak] = {}
    used = cached = 0.0
    while proc.poll() is None:
        for pid in pids(proc.pid):
            try:
                anon, file = status_kb(pid)
            except (OSError, KeyError):
                continue
            old = peaks.get(pid, (0.0, 0.0))
            peaks[pid] = (max(old[0], anon * 1024 / GB), max(old[1], file * 1024 / GB))
        info = {k: int(v.split()[0]) * 1024 / GB for k, v in
                (line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())}
        used = max(used, info["MemTotal"] - info["MemAvailable"])
        cached = max(cached, info["Cached"])
        time.sleep(0.02)
    err = proc.stderr.read()
    if proc.returncode:
        print(err[-3000:], file=sys.stderr)
    return proc.returncode, peaks, used, cached, time.perf_counter() - start


def acceptance_search(cache: Path) -> None:
    """The 1.1B search of the issue: peak anonymous memory of the search process against 2 x live + 1.5 GB."""
    paths = family(cache, "1.1b")
    with tempfile.TemporaryDirectory() as tmp:
        spec = search_spec(paths, 3, 4, Path(tmp))
        cmd = [sys.executable, "-m", "evomerge.cli", "search", str(spec), "--budget", "3", "--run", f"{tmp}/run",
               "--executor", "local"]
        rc, peaks, used, cached, seconds = watch(cmd, lambda pid: [pid])
    live = sum(f.stat().st_size for f in paths["base"].glob("*.safetensors")) / GB
    anon, file = peaks.get(next(iter(peaks)), (0.0, 0.0))
    print(f"\n1.1B base + 3 experts, bf16, --budget 3 in-process on the CPU: rc {rc}, {seconds:.0f} s; "
          f"peak anonymous {anon:.2f} GB (limit 2 x {live:.2f} + 1.5 = {2 * live + 1.5:.2f} GB), peak file-backed "
          f"{file:.2f} GB, node used {used:.2f} GB, page cache {cached:.2f} GB")


def ray_search(cache: Path) -> None:
    """Two Ray workers on this node over the 165m zoo (3 experts): each worker's peaks and the node's totals."""
    paths = family(cache, "165m")
    live = sum(f.stat().st_size for f in paths["base"].glob("*.safetensors")) / GB

    def workers(_: int) -> list[int]:
        out = subprocess.run(["pgrep", "-f", "ray::Worker"], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    with tempfile.TemporaryDirectory() as tmp:
        spec = search_spec(paths, 3, 8, Path(tmp))
        cmd = [sys.executable, "-m", "evomerge.cli", "search", str(spec), "--budget", "6", "--run", f"{tmp}/run",
               "--executor", "ray", "--workers", "2"]
        rc, peaks, used, cached, seconds = watch(cmd, workers)
    print(f"\nRay, 2 workers on one node, 165m base + 3 experts (live model {live:.2f} GB, inputs "
          f"{4 * live:.2f} GB of files): rc {rc}, {seconds:.0f} s")
    for pid, (anon, file) in peaks.items():
        print(f"  worker pid {pid}: peak anonymous {anon:.2f} GB, peak file-backed {file:.2f} GB")
    print(f"  node: used (MemTotal - MemAvailable) peak {used:.2f} GB, page cache peak {cached:.2f} GB")


def projection() -> None:
    """What each GPU and each node must hold for 3 experts, by formula (bf16 inputs, bf16 live model)."""
    print("\nprojection, 3 experts, bf16 (largest tensor: the 128k- or 32k-row embedding in float32 x (N + 4)):")
    print("| model | live model | inputs on device: per GPU | inputs in host memory: per GPU | page cache per node |")
    print("|---|---|---|---|---|")
    for name, params, largest in (("7B (Llama-2 shape, 32k vocab)", 6.74e9, 32000 * 4096),
                                  ("70B over 8 GPUs (Llama-2 shape)", 69.0e9, 32000 * 8192)):
        live = 2 * params
        gpus = 8 if name.startswith("70B") else 1
        scratch = 4 * largest * 7
        print(f"| {name} | {live / GB:.0f} GB | {(4 * live / gpus + live / gpus + scratch) / GB:.0f} GB "
              f"| {(live / gpus + scratch) / GB:.1f} GB | {4 * live / GB:.0f} GB |")


# ---- the table -------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["demo", "165m", "real", "1.1b"],
                        choices=["demo", "165m", "real", "1.1b"])
    parser.add_argument("--experts", nargs="+", type=int, default=[2, 3, 5])
    parser.add_argument("--placements", nargs="+", default=["host", "device", "baseline"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument("--search", action="store_true")
    parser.add_argument("--ray", action="store_true")
    parser.add_argument("--table", action="store_true", help="the placement table (default unless --search/--ray)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "evomerge-bench-memory")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(cell(json.loads(args.cell))))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.table or not (args.search or args.ray):
        table(args)
    if args.search:
        acceptance_search(args.cache)
    if args.ray:
        ray_search(args.cache)
    projection()


def table(args: argparse.Namespace) -> None:
    old = baseline_tree(args.baseline) if "baseline" in args.placements else None
    print("| model | experts | placement | live GB | peak anon GB | anon / live | peak file GB | "
          + " | ".join(f"{m} s" for m in METHODS) + " |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(METHODS))
    try:
        for name in args.models:
            paths = family(args.cache, name)
            live = sum(f.stat().st_size for f in paths["base"].glob("*.safetensors")) / GB
            for n in args.experts:
                models = [str(paths[f"ft{i}"]) for i in range(1, n + 1)]
                rows: dict[str, dict] = {}
                for placement in args.placements:
                    need = (2 * n + 1) * 2 * live + live  # float32 base, weights and task vectors + the live model
                    if placement == "baseline" and need > 0.9 * host_memory():
                        print(f"| {name} | {n} | baseline | {live:.2f} | (needs ~{need:.0f} GB: does not fit) |"
                              " | |" + " |" * len(METHODS))
                        continue
                    row = run_cell({"base": str(paths["base"]), "models": models, "placement": placement,
                                    "repeat": args.repeat}, old if placement == "baseline" else None)
                    rows[placement] = row
                    times = " | ".join(f"{row[m]:.2f}" for m in METHODS)
                    print(f"| {name} | {n} | {placement} | {row['live_gb']:.2f} | {row['anon_gb']:.2f} | "
                          f"{row['anon_gb'] / row['live_gb']:.1f}x | {row['file_gb']:.2f} | {times} |", flush=True)
                for placement in ("host", "device"):
                    if placement in rows and "baseline" in rows:
                        ratios = ", ".join(f"{m} {rows[placement][m] / rows['baseline'][m]:.2f}x" for m in METHODS)
                        print(f"|   | {n} | {placement} / baseline time | | | | | {ratios} |", flush=True)
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


if __name__ == "__main__":
    main()
