"""Hugging Face Hub ids (``org/name[@revision]``) as model references, resolved from a local HF cache that
each test lays out under a temporary HF_HOME in huggingface_hub's own layout, offline:
``hub/models--org--name/{blobs/<hash>, refs/<revision> -> commit, snapshots/<commit>/<file> -> blob}``."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import SMALL, cache_model, commit_of, tree_digest
from huggingface_hub import constants, scan_cache_dir
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.demo import TASKS_DIR, model_path
from evomerge.errors import SpecError
from evomerge.hub import parse_hub_id
from evomerge.models import open_checkpoint
from evomerge.refs import resolve_model_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")






@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    """org/base, org/add, org/reverse (demo models, on main) and org/expert: main holds the demo 'add'
    model, tag v2 the demo 'reverse' model."""
    home = tmp_path_factory.mktemp("hf_home")
    hub = home / "hub"
    for name in ("base", "add", "reverse"):
        cache_model(hub, f"org/{name}", model_path(name), commit_of(name))
    cache_model(hub, "org/expert", model_path("add"), commit_of("expert-1"))
    cache_model(hub, "org/expert", model_path("reverse"), commit_of("expert-2"), refs=("v2",))
    return home


@pytest.fixture
def hub_cache(hf_home, monkeypatch) -> Path:
    """The cache for this process: huggingface_hub reads HF_HOME at import, so its constants are patched."""
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hf_home / "hub"


def cli(args: list[str], hf_home: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``evomerge ARGS`` in a fresh process whose environment names the cache, as a user's shell would."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "evomerge.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def write_recipe(path: Path, base: str, models: list[str]) -> Path:
    path.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": base,
        "models": [{"model": m, "parameters": {"weight": w, "density": [0.5, 0.9]}}
                   for m, w in zip(models, (1.0, 0.7), strict=True)]}))
    return path


def test_the_cache_is_laid_out_as_huggingface_hub_reads_it(hf_home):
    info = scan_cache_dir(hf_home / "hub")
    assert not info.warnings
    repos = {r.repo_id: r for r in info.repos}
    assert set(repos) == {"org/base", "org/add", "org/reverse", "org/expert"}
    assert {ref: rev.commit_hash for ref, rev in repos["org/expert"].refs.items()} == {
        "main": commit_of("expert-1"), "v2": commit_of("expert-2")}


@pytest.mark.slow
def test_merge_of_hub_ids_is_bit_identical_to_local_folders(hf_home, tmp_path):
    hub_recipe = write_recipe(tmp_path / "hub.yaml", "org/base", ["org/add", "org/expert@v2"])
    local_recipe = write_recipe(tmp_path / "local.yaml", str(model_path("base")),
                                [str(model_path("add")), str(model_path("reverse"))])
    done = cli(["merge", str(hub_recipe), "--out", str(tmp_path / "hub_out")], hf_home, tmp_path)
    assert done.returncode == 0, done.stderr
    assert main(["merge", str(local_recipe), "--out", str(tmp_path / "local_out")]) == 0
    hub, local = load_file(tmp_path / "hub_out" / "model.safetensors"), load_file(tmp_path / "local_out" /
                                                                                 "model.safetensors")
    assert hub.keys() == local.keys()
    for name, tensor in local.items():
        assert hub[name].dtype == tensor.dtype and torch.equal(hub[name], tensor), name
    assert not torch.equal(local["model.embed_tokens.weight"], load_file(
        model_path("base") / "model.safetensors")["model.embed_tokens.weight"])  # a real merge took place


def test_revisions_resolve_to_their_snapshot(hub_cache):
    snapshots = hub_cache / "models--org--expert" / "snapshots"
    assert resolve_model_path("org/expert") == snapshots / commit_of("expert-1")
    assert resolve_model_path("org/expert@main") == snapshots / commit_of("expert-1")
    assert resolve_model_path("org/expert@v2") == snapshots / commit_of("expert-2")
    assert resolve_model_path(f"org/expert@{commit_of('expert-2')}") == snapshots / commit_of("expert-2")
    v2, reverse = open_checkpoint("org/expert@v2"), open_checkpoint("demo:reverse")
    assert v2.config == reverse.config
    name = "model.embed_tokens.weight"
    assert torch.equal(load_file(v2.tensors[name].file)[name], load_file(reverse.tensors[name].file)[name])

    with pytest.raises(SpecError) as err:
        resolve_model_path("org/expert@v3")
    message = str(err.value)
    assert "\n" not in message and message.startswith("model org/expert@v3: ")
    for part in ("revision v3 is not in the Hugging Face cache", str(hub_cache), "cached revisions: main, v2",
                 "HF_HUB_OFFLINE", "`hf download org/expert --revision v3`"):
        assert part in message, message


@pytest.mark.slow
def test_an_uncached_hub_id_is_one_line_exit_2_and_writes_nothing(hf_home, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", "org/base", ["org/add", "org/missing@v1"])
    before = tree_digest(tmp_path), tree_digest(hf_home)
    done = cli(["merge", str(recipe), "--out", str(tmp_path / "out")], hf_home, tmp_path)
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for part in ("model org/missing@v1", "is not in the Hugging Face cache", str(hf_home / "hub"),
                 "HF_HUB_OFFLINE is set", "`hf download org/missing --revision v1`"):
        assert part in err, err
    assert (tree_digest(tmp_path), tree_digest(hf_home)) == before
    assert not (tmp_path / "out").exists()


def tiny_add_task(root: Path) -> Path:
    """The demo 'add' task with 12 documents per split (the search's final re-scoring reads whole splits)."""
    demo = TASKS_DIR
    (root / "data").mkdir(parents=True)
    (root / "hub_add.yaml").write_text((demo / "demo_add.yaml").read_text().replace("task: demo_add", "task: hub_add"))
    for split in ("search", "validation", "test"):
        lines = (demo / "data" / f"add_{split}.jsonl").read_text().splitlines(keepends=True)
        (root / "data" / f"add_{split}.jsonl").write_text("".join(lines[:12]))
    return root


@pytest.mark.slow
def test_search_with_hub_ids(hub_cache, tmp_path, capsys):
    evaluation = {**SMALL["evaluation"], "include_paths": [str(tiny_add_task(tmp_path / "tasks"))],
                  "tasks": [{"name": "hub_add"}], "search_examples": 8, "screen_examples": 4}
    spec = {**SMALL, "base_model": "org/base", "models": ["org/add", "org/expert@v2"], "evaluation": evaluation}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    run = tmp_path / "run"
    assert main(["search", str(tmp_path / "spec.yaml"), "--budget", "2", "--run", str(run)]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").exists()

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**spec, "models": ["org/add", "org/missing"]}))
    capsys.readouterr()
    assert main(["search", str(bad), "--budget", "2", "--run", str(tmp_path / "bad_run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model org/missing: " in err, err
    assert not (tmp_path / "bad_run").exists()


def test_an_existing_local_folder_wins_over_the_hub(hub_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("org/add") == hub_cache / "models--org--add" / "snapshots" / commit_of("add")
    shutil.copytree(model_path("sort"), tmp_path / "org" / "add")
    assert resolve_model_path("org/add") == Path("org/add")
    assert open_checkpoint("org/add").path.resolve() == tmp_path / "org" / "add"


@pytest.mark.parametrize("ref, parsed", [
    ("org/name", ("org/name", None)),
    ("Org-1/name_2.x@v1.0", ("Org-1/name_2.x", "v1.0")),
    ("org/name@refs/pr/1", ("org/name", "refs/pr/1")),
    ("name", None), ("org/name@", None), ("a/b/c", None), ("./org/name", None), ("../org/name", None),
    ("/org/name", None), ("~/org", None), ("org--x/name", None), ("org/na me", None),
])
def test_what_counts_as_a_hub_id(ref, parsed):
    assert parse_hub_id(ref) == parsed


@pytest.mark.parametrize("ref", ["no/such/folder", "./org/name", "org/name@", "gpt2", "/no/such/model"])
def test_other_missing_refs_keep_the_folder_error(hub_cache, ref, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError, match=f"^model folder not found: {ref}$"):
        open_checkpoint(ref)


def test_the_cache_comes_first_and_a_hub_that_cannot_be_reached_is_one_line(hub_cache, monkeypatch):
    """With downloads allowed, a cached model needs no network; an uncached one asks the Hub (here a closed
    loopback port) and fails in one line."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    assert resolve_model_path("org/expert@v2") == hub_cache / "models--org--expert" / "snapshots" / commit_of(
        "expert-2")
    with pytest.raises(SpecError) as err:
        resolve_model_path("org/missing")
    message = str(err.value)
    assert "\n" not in message and message.startswith("model org/missing: "), message
    assert f"the Hugging Face Hub (http://127.0.0.1:{port}) cannot be reached" in message, message
