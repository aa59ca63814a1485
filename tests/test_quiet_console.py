"""The search's console shows only evomerge's own lines: lm-eval loading each task through ``datasets`` (into an
empty datasets cache, where "Generating search split" bars and, for a task with ``process_docs``, "Map" bars
would appear) prints nothing, and a bad input found after the tasks loaded is still its one line."""

import logging
import os
import subprocess
import sys

import datasets
import pytest
import yaml
from huggingface_hub import utils as hub_utils

from evomerge.demo import TASKS_DIR
from evomerge.evaluate import _quiet_datasets

# what datasets, huggingface_hub and tqdm print; our progress line is rich's ("trials ━━━ 2/2 best ...")
LIBRARY_CHATTER = ("Generating", "Map", "Downloading", "Loading", "examples/s", "it/s", "%|", "Warning", "WARNING")
SPLITS = {"search": "search[0:12]", "validation": "validation[0:8]", "test": "test[0:8]"}


def task_folder(root):
    """demo_add as a task whose documents go through ``process_docs`` (a ``datasets`` map, with its own bar)."""
    folder = root / "tasks"
    folder.mkdir()
    config = yaml.safe_load((TASKS_DIR / "demo_add.yaml").read_text())
    files = config["dataset_kwargs"]["data_files"]
    config["dataset_kwargs"]["data_files"] = {split: str(TASKS_DIR / path) for split, path in files.items()}
    config["task"] = "mapped_add"
    text = yaml.safe_dump(config) + "process_docs: !function utils.mapped\n"
    (folder / "mapped_add.yaml").write_text(text)
    (folder / "utils.py").write_text("def mapped(docs):\n    return docs.map(lambda doc: {'prompt': doc['prompt']})\n")
    return folder


def run_search(tmp_path, splits: dict[str, str]) -> subprocess.CompletedProcess:
    """``evomerge search`` in a subprocess with an empty datasets cache and the libraries' progress bars allowed."""
    spec = {"base_model": "demo:base", "models": ["demo:add", "demo:reverse"],
            "space": {"methods": ["linear"], "granularity": "global"},
            "evaluation": {"include_paths": [str(task_folder(tmp_path)), "demo"], "search_examples": None,
                           "screen_examples": None, "top_k": 1,
                           "tasks": [{"name": "mapped_add", "splits": splits},
                                     {"name": "demo_reverse", "splits": SPLITS}]},
            "sampler": "random", "seed": 0, "device": "cpu"}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if not k.endswith("_DISABLE_PROGRESS_BARS") and k != "TQDM_DISABLE"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "datasets-cache"))
    cmd = [sys.executable, "-m", "evomerge.cli", "search", str(tmp_path / "spec.yaml"), "--budget", "2",
           "--run", str(tmp_path / "run")]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)


def chatter(text: str) -> list[str]:
    """Lines (tqdm redraws with carriage returns, so those split lines too) that hold a library's output."""
    lines = text.replace("\r", "\n").splitlines()
    return [line for line in lines if any(s in line for s in LIBRARY_CHATTER)]


@pytest.mark.slow
def test_search_console_shows_only_our_progress(tmp_path):
    done = run_search(tmp_path, SPLITS)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "datasets-cache").is_dir()  # the tasks' splits were generated, not read from a cache
    assert "run folder:" in done.stderr + done.stdout and "winner: trial" in done.stdout
    assert chatter(done.stdout) == [] and chatter(done.stderr) == [], done.stderr


@pytest.mark.slow
def test_bad_input_found_after_loading_is_one_line(tmp_path):
    """A doc range past the end of a processed split shows only once the task is loaded (process_docs hides the
    size from the YAML checks): the one-line error, exit 2, with no progress bars before it."""
    done = run_search(tmp_path, {**SPLITS, "search": "search[0:5000]"})
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip()
    assert "Traceback" not in err and "reaches past the end of split 'search' (1000 documents)" in err
    assert [line for line in err.replace("\r", "\n").splitlines() if line.strip()] == [err], err
    assert chatter(done.stdout) == []


def test_quieting_is_undone_after_loading_and_on_errors():
    """The progress bars and log levels of datasets and huggingface_hub are theirs again after the tasks load,
    also when loading fails (and the error is not swallowed)."""
    loggers = [logging.getLogger(name) for name in ("datasets", "huggingface_hub")]
    before = ([logger.level for logger in loggers], datasets.are_progress_bars_disabled(),
              hub_utils.are_progress_bars_disabled())
    with pytest.raises(ValueError, match="bad data"), _quiet_datasets():
        assert datasets.are_progress_bars_disabled() and hub_utils.are_progress_bars_disabled()
        assert all(logger.getEffectiveLevel() >= logging.ERROR for logger in loggers)
        raise ValueError("bad data")
    after = ([logger.level for logger in loggers], datasets.are_progress_bars_disabled(),
             hub_utils.are_progress_bars_disabled())
    assert after == before
