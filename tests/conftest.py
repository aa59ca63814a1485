"""Shared fixtures: tiny random models built in the test session, offline."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import Mergekit, _family
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

# The skips that say a test cannot apply to this machine (no CUDA device). Any other skip (a test dependency or
# the real model not installed) fails the session: a green run never hides tests that did not run.
INAPPLICABLE_HERE = ("needs a CUDA device",)
_unexpected_skips: list[str] = []


def _record_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    """Keep a skip (not an expected failure) whose reason is not one of INAPPLICABLE_HERE."""
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not any(allowed in reason for allowed in INAPPLICABLE_HERE):
            _unexpected_skips.append(f"{report.nodeid}: {reason}")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _record_skip(report)  # a module skipped as a whole


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _record_skip(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _unexpected_skips and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _unexpected_skips:
        terminalreporter.section("skipped, but must run on this machine (see tests/conftest.py)", red=True)
        for line in _unexpected_skips:
            terminalreporter.line(line, red=True)


@pytest.fixture(autouse=True)
def _small_merge_slices(request, monkeypatch):
    """Elementwise merges (linear, task_arithmetic) run large tensors slice by slice; with slices of 97 entries
    every tensor of the tiny test models past 97 entries takes that path, in several uneven slices. Tests of
    real-sized models (marked ``full_slices``) keep the real slice: 97 entries would make each merge 2,700x as
    many steps."""
    import evomerge.merge

    if request.node.get_closest_marker("full_slices") is None:
        monkeypatch.setattr(evomerge.merge, "SLICE", 97)




@pytest.fixture(scope="session")
def mergekit():
    """mergekit's own commands, served by one interpreter for the session (see helpers.Mergekit)."""
    server = Mergekit()
    yield server
    server.close()


@pytest.fixture(scope="session")
def llama_zoo(tmp_path_factory) -> dict[str, Path]:
    """A 3-layer random Llama (vocab of the demo tokenizer) and three perturbed copies, fp32."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=46, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return _family(tmp_path_factory.mktemp("llama"), LlamaForCausalLM(config), ["a", "b", "c"], 0.02, 1)


@pytest.fixture(scope="session")
def gpt2_zoo(tmp_path_factory) -> dict[str, Path]:
    """A 2-layer random GPT-2 (tied embeddings, Conv1D layout) and two perturbed copies."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=46, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return _family(tmp_path_factory.mktemp("gpt2"), GPT2LMHeadModel(config), ["a", "b"], 0.02, 2)
