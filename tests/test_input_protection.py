"""No command destroys or writes into an input, ``--force`` or not: an output (``merge``, ``export``) or run
folder (``search``) is refused when it is, contains or lies inside an input folder, or is or contains a file an
input reads, wherever that file's link leads (a Hugging Face cache snapshot's files link into ``blobs/``, a local
model's may link anywhere). An empty or blank ``--out``/``--run`` is refused too (it would mean the current
folder). Each refusal is one line, exit code 2, and leaves every file and link under the test's folder as it was.

The inputs: base ``org/base`` from a Hugging Face cache laid out here, model ``linked`` whose one weights file
links into ``store/``, model ``sharded`` whose shards link into ``shards/``."""

import hashlib
import os
import shutil
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from helpers import cache_model, commit_of
from huggingface_hub import constants
from transformers import AutoModelForCausalLM

from evomerge.cli import main
from evomerge.recipes import Recipe
from evomerge.run import STUDY_NAME, RunFolder, sqlite_url

# where an output or run folder may not go, relative to the test's folder
INPUT_CLASSES = {
    "the folder a single weights file links into": "store",
    "the linked weights file itself": "store/model.safetensors",
    "the folder sharded weights link into": "shards",
    "the HF cache's blobs folder": "hf/hub/models--org--base/blobs",
    "the parent of the blobs folder": "hf/hub/models--org--base",
    "the HF cache": "hf/hub",
    "a linked input folder": "models/linked",
    "inside an input folder": "models/sharded/out",
    "a folder holding input folders": "models",
    "a link to an input folder": "link-to-linked",
}


def state(root: Path) -> dict[str, tuple[str, str]]:
    """Every entry under ``root``: a link with its target, a file with its bytes' hash, a folder."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            entries[str(path.relative_to(root))] = (
                ("link", os.readlink(path)) if path.is_symlink() else ("dir", "") if path.is_dir()
                else ("file", hashlib.sha256(path.read_bytes()).hexdigest()))
    return entries


@pytest.fixture
def inputs(llama_zoo, tmp_path, monkeypatch) -> dict[str, str]:
    """The three inputs laid out under ``tmp_path`` (the current folder): their model references."""
    monkeypatch.chdir(tmp_path)
    hub = tmp_path / "hf" / "hub"
    cache_model(hub, "org/base", llama_zoo["base"], commit_of("base"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    linked = tmp_path / "models" / "linked"
    shutil.copytree(llama_zoo["a"], linked)
    (tmp_path / "store").mkdir()
    shutil.move(linked / "model.safetensors", tmp_path / "store" / "model.safetensors")
    (linked / "model.safetensors").symlink_to(tmp_path / "store" / "model.safetensors")

    sharded = tmp_path / "models" / "sharded"
    AutoModelForCausalLM.from_pretrained(llama_zoo["b"], dtype=torch.float32).save_pretrained(
        sharded, max_shard_size="40KB", safe_serialization=True)
    for item in llama_zoo["b"].iterdir():
        if item.name.startswith("tokenizer"):
            shutil.copy(item, sharded / item.name)
    (tmp_path / "shards").mkdir()
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    for shard in shards:
        shutil.move(shard, tmp_path / "shards" / shard.name)
        shard.symlink_to(Path("..") / ".." / "shards" / shard.name)

    (tmp_path / "link-to-linked").symlink_to(linked, target_is_directory=True)
    return {"base": "org/base", "linked": str(linked), "sharded": str(sharded)}


def ties(inputs: dict[str, str]) -> dict:
    return {"merge_method": "ties", "base_model": inputs["base"], "dtype": "float32",
            "models": [{"model": inputs[name], "parameters": {"weight": 0.5, "density": 0.5}}
                       for name in ("linked", "sharded")]}


@pytest.fixture
def recipe(inputs, tmp_path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(ties(inputs)))
    return path


@pytest.fixture
def run(inputs, tmp_path) -> Path:
    """A run folder whose trial 0 is that recipe (as a finished search records it), for ``export``."""
    root = tmp_path / "run"
    root.mkdir()
    spec = {"base_model": inputs["base"], "models": [inputs["linked"], inputs["sharded"]], "device": "cpu",
            "evaluation": {"include_paths": ["demo"], "tasks": [{"name": "demo_add"}]}}
    RunFolder(root).write_doc(spec, "digest", 1, None, STUDY_NAME)
    recipe = Recipe.model_validate(ties(inputs)).model_dump(mode="json", exclude_defaults=True)
    study = optuna.create_study(study_name=STUDY_NAME, storage=sqlite_url(root / "study.db"), direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={
        "recipe": recipe, "scores": {"demo_add": 0.5}, "fidelity": "full"}))
    return root


@pytest.fixture
def spec(inputs, tmp_path) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({
        "base_model": inputs["base"], "models": [inputs["linked"], inputs["sharded"]], "device": "cpu",
        "space": {"methods": ["ties"], "granularity": "global"}, "sampler": "random",
        "evaluation": {"include_paths": ["demo"], "tasks": [{"name": "demo_add"}]}}))
    return path


def refused(args: list[str], root: Path, capsys) -> str:
    """Run ``evomerge ARGS``: it must exit 2 with one line and change nothing under ``root``; the line."""
    before = state(root)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert state(root) == before
    return err


def test_a_merge_beside_the_inputs_is_written(recipe, tmp_path):
    """The layout is a valid merge: what the other tests refuse is the place, not the inputs."""
    assert main(["merge", str(recipe), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()


@pytest.mark.parametrize("where", INPUT_CLASSES.values(), ids=INPUT_CLASSES.keys())
def test_merge_never_writes_over_an_input(recipe, tmp_path, where, capsys):
    out = tmp_path / where
    err = refused(["merge", str(recipe), "--out", str(out), "--force"], tmp_path, capsys)
    assert f"output folder {out} " in err and "which must stay untouched" in err


@pytest.mark.parametrize("where", INPUT_CLASSES.values(), ids=INPUT_CLASSES.keys())
def test_export_never_writes_over_an_input(run, tmp_path, where, capsys):
    out = tmp_path / where
    err = refused(["export", str(run), "--trial", "0", "--out", str(out), "--force"], tmp_path, capsys)
    assert f"output folder {out} " in err and "which must stay untouched" in err


@pytest.mark.parametrize("where", [*INPUT_CLASSES.values(), "models/linked/runs/r"],
                         ids=[*INPUT_CLASSES.keys(), "deep inside an input folder"])
def test_a_run_folder_keeps_clear_of_the_inputs(spec, tmp_path, where, capsys):
    folder = tmp_path / where
    err = refused(["search", str(spec), "--budget", "1", "--run", str(folder), "--force"], tmp_path, capsys)
    assert f"run folder {folder} " in err and "which must stay untouched" in err


@pytest.mark.parametrize("blank", ["", "   "])
@pytest.mark.parametrize("command", ["merge", "export", "search", "resume"])
def test_a_blank_folder_argument_is_refused(command, blank, recipe, run, spec, tmp_path, capsys):
    args = {"merge": ["merge", str(recipe), "--out", blank, "--force"],
            "export": ["export", str(run), "--trial", "0", "--out", blank, "--force"],
            "search": ["search", str(spec), "--budget", "1", "--run", blank, "--force"],
            "resume": ["search", "--resume", blank]}[command]
    err = refused(args, tmp_path, capsys)
    assert f"{blank!r} names no folder" in err
