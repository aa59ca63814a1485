"""Helpers shared by test modules (imported as ``helpers``; pytest puts this folder on the path)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
import yaml
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from evomerge.cli import main
from evomerge.demo import model_path
from evomerge.executors import InProcessExecutor
from evomerge.launch import run_search
from evomerge.models import open_checkpoint
from evomerge.run import STUDY_NAME, RunFolder, counted
from evomerge.spec import SearchSpec
from evomerge.worker import Worker

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def in_process(spec: SearchSpec) -> InProcessExecutor:
    """One worker in this process: the models load here, now."""
    return InProcessExecutor(Worker(spec))


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` without opening anything but regular files (a FIFO is never opened): a link
    and its target, a regular file's hash, any other entry's kind. Equal snapshots: nothing written or removed."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            mode = path.lstat().st_mode
            entries[str(path.relative_to(root))] = (
                ("link", os.readlink(path)) if stat.S_ISLNK(mode) else
                ("file", hashlib.sha256(path.read_bytes()).hexdigest()) if stat.S_ISREG(mode) else
                ("kind", stat.S_IFMT(mode)))
    return entries


SPEC = {
    "base_model": "demo:base",
    "models": ["demo:add", "demo:reverse"],
    "space": {"methods": ["linear"], "granularity": "groups:2", "parameters": {"weight": {"low": 0.0, "high": 1.0}}},
    "evaluation": {"include_paths": ["demo"], "tasks": [{"name": "demo_add"}, {"name": "demo_reverse", "weight": 2}],
                   "search_examples": 40, "screen_examples": 15, "top_k": 2},
    "sampler": "cmaes",
    "seed": 3,
}

CLI_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

def study_of(run_dir):
    return optuna.load_study(study_name=STUDY_NAME, storage=RunFolder(run_dir).default_storage())

def wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> bool:
    """Poll for an event; False when the process ended first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the awaited event never came"
        time.sleep(0.02)
    return True

def sigkill_at(cmd: list[str], event) -> bool:
    """Run the command (an `evomerge` CLI call, offline) and SIGKILL it once ``event(proc)`` holds; False when
    it ended before the event."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=CLI_ENV)
    hit = wait_for(lambda: event(proc), proc)
    if hit:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return hit

SMALL = {**SPEC, "evaluation": {**SPEC["evaluation"], "top_k": 1, "search_examples": 20, "screen_examples": 8},
         "device": "cpu"}

def tree_digest(root) -> dict[str, str]:
    """Every file below ``root`` with a hash of its bytes (to prove nothing was written or removed)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}

def one_line_error(capsys, expected: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert expected in err, err
    return err


def search_refused(doc: dict, tmp_path, capsys, expected: str) -> None:
    """A search on the spec ``doc`` stops before compute: exit 2, one line naming ``expected``, no run folder."""
    spec, run = tmp_path / "bad.yaml", tmp_path / "run"
    spec.write_text(yaml.safe_dump(doc))
    capsys.readouterr()
    assert main(["search", str(spec), "--budget", "2", "--run", str(run)]) == 2
    one_line_error(capsys, expected)
    assert not run.exists()

def weights(path):
    ckpt = open_checkpoint(str(path))
    return {n: ckpt.read(n) for n in ckpt.tensors}

def build_tied_zoo(root, dtype_name: str):
    """A 3-layer Llama base and three experts in fp16 or bf16 whose task vectors take only the magnitudes
    0, 1, 2, 3 / 512 (all exact in both dtypes): the top-k cut of TIES falls inside thousands of ties."""
    dtype = getattr(torch, dtype_name)
    config = LlamaConfig(vocab_size=46, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         architectures=["LlamaForCausalLM"], torch_dtype=dtype_name)
    shapes = {n: p.shape for n, p in AutoModelForCausalLM.from_config(config).named_parameters()}
    gen = torch.Generator().manual_seed(0)
    base = {n: (torch.randint(-32, 33, s, generator=gen) / 256).to(dtype) for n, s in shapes.items()}
    paths = {}
    for name in ("base", "a", "b", "c"):
        tensors = base if name == "base" else {
            n: (t.float() + torch.randint(-3, 4, t.shape, generator=gen) / 512).to(dtype) for n, t in base.items()}
        paths[name] = root / name
        config.save_pretrained(paths[name])
        save_file(tensors, paths[name] / "model.safetensors", metadata={"format": "pt"})
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(model_path("base") / f, paths[name] / f)
    return paths

def checksums(*folders) -> dict[str, str]:
    """Every file under the folders, by path: its content hash (and nothing else may appear or vanish)."""
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest()
            for folder in folders for f in sorted(folder.rglob("*")) if f.is_file()}

def search_and_finalize(spec: SearchSpec, folder, budget: int) -> dict:
    """A new run of ``spec`` in ``folder`` through exactly ``budget`` counted trials and the hold-out check; the
    summary, whose winner is one of the trials."""
    done = run_search(spec, RunFolder(folder), budget, in_process(spec))
    trials = done.search.study.get_trials()
    assert sum(counted(t) for t in trials) == budget
    assert done.summary["winner_trial"] in {t.number for t in trials}
    return done.summary

def commit_of(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()

def cache_model(hub: Path, repo_id: str, src: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put the files of model folder ``src`` into the cache as huggingface_hub stores a download: content
    in ``blobs/`` (named by sha256 for LFS files, by git blob sha1 otherwise), the snapshot as relative
    symlinks to the blobs, and each ref (branch or tag) a file holding the commit hash."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in sorted(src.iterdir()):
        data = file.read_bytes()
        blob = (hashlib.sha256(data).hexdigest() if file.suffix == ".safetensors"
                else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / blob)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot

def _family(root: Path, base: torch.nn.Module, names: list[str], scale: float, seed: int) -> dict[str, Path]:
    """Save ``base`` and noisy variants of it (its 'fine-tunes') as HF folders with a tokenizer."""
    torch.manual_seed(seed)
    paths = {}
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    for name in ["base", *names]:
        if name != "base":
            base.load_state_dict({k: v + scale * torch.randn_like(v) for k, v in base_state.items()})
        out = root / name
        base.save_pretrained(out, safe_serialization=True)
        for f in TOKENIZER_FILES:
            shutil.copy(model_path("base") / f, out / f)
        paths[name] = out
    base.load_state_dict(base_state)
    return paths


# mergekit's own commands (``mergekit-yaml``, ``mergekit-multi``: their console-script entry points) served by one
# long-lived interpreter: a request is one JSON line [command, args, cwd], the reply one JSON line, the traceback of
# a failed run or "". Whatever mergekit prints goes to stderr (here: nowhere), never into the replies.
MERGEKIT_SERVER = """
import json, os, sys, traceback
from importlib.metadata import entry_points
replies = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
commands = {e.name: e for e in entry_points(group="console_scripts") if e.name.startswith("mergekit-")}
for line in sys.stdin:
    name, args, cwd = json.loads(line)
    os.chdir(cwd)
    try:
        commands[name].load()(args, standalone_mode=False)
        error = ""
    except BaseException:
        error = traceback.format_exc()
    replies.write(json.dumps(error) + "\\n")
    replies.flush()
"""


@dataclass(frozen=True)
class MergekitRun:
    returncode: int
    stderr: str


class Mergekit:
    """mergekit's commands in one interpreter for the whole session: one start-up (torch, transformers and
    mergekit imported: seconds on this machine) instead of one per merge. A fixed hash seed, since mergekit orders
    models by a set's order; its random methods draw from its global RNG, which runs on from merge to merge."""

    def __init__(self) -> None:
        self._server = subprocess.Popen([sys.executable, "-c", MERGEKIT_SERVER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                        env={**CLI_ENV, "PYTHONHASHSEED": "0"})

    def run(self, command: str, *args: str | Path, cwd: Path | None = None) -> MergekitRun:
        """``command ARGS...`` (e.g. ``mergekit-yaml CONFIG OUT``) as mergekit's own command runs it."""
        self._server.stdin.write(json.dumps([command, [str(a) for a in args], str(cwd or Path.cwd())]) + "\n")
        self._server.stdin.flush()
        reply = self._server.stdout.readline()
        if not reply:
            return MergekitRun(1, f"the mergekit server ended (exit {self._server.wait()})")
        error = json.loads(reply)
        return MergekitRun(1 if error else 0, error)

    def close(self) -> None:
        self._server.stdin.close()
        self._server.wait()
