"""A Worker: one live model on one device. It loads the base and the models it merges once, then per job
merges the recipe in place and scores it (through the job's race: the first rung first, the rest only while
promising). Executors (``evomerge.executors``) hand it jobs, in this process or in a Ray actor."""

from __future__ import annotations

import gc
import math
import os
import time
from collections.abc import Sequence

import torch

from evomerge.dataflow import LivePath
from evomerge.errors import SpecError
from evomerge.evaluate import EvalResult, Evaluator
from evomerge.executors import Job, Outcome
from evomerge.merge import DTYPES, LiveMerger
from evomerge.racing import run_race
from evomerge.recipes import RecipeForm
from evomerge.refs import resolve_model_path
from evomerge.spec import SearchSpec


def pick_device(requested: str) -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def include_paths(spec: SearchSpec) -> list[str]:
    """Task folders of a spec, ``demo`` standing for the built-in demo tasks."""
    from evomerge.demo import TASKS_DIR

    return [str(TASKS_DIR) if p == "demo" else p for p in spec.evaluation.include_paths]


class Worker:
    """One live model: merge a recipe into it in place, then score it on chosen documents."""

    def __init__(self, spec: SearchSpec, threads: int | None = None, label: str = "in-process",
                 spread: bool = False) -> None:
        """``spread``: place the model over every visible GPU (a model too large for one), else on one device.
        The inputs are placed by ``spec.inputs_on`` once the model is loaded (refused here when they cannot fit)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.device = pick_device(spec.device)
        self.name = f"{label}:{self.device}:pid{os.getpid()}"
        base = resolve_model_path(spec.base_model)
        if spread:
            model = AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES[spec.dtype], device_map="auto")
        else:
            model = AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES[spec.dtype]).to(self.device)
        self.model = model.eval()
        tokenizer = AutoTokenizer.from_pretrained(base)
        self.spec = spec
        dataflow = spec.space.kind == "dataflow"
        # a data-flow worker merges weights only for the hold-out check's references: built then, not before
        self._merger: LiveMerger | None = None
        if not dataflow and self.merger.vocab is not None:  # candidates speak the merged vocabulary
            tokenizer = self.merger.vocab.tokenizer
        self.paths = LivePath(self.model, [spec.base_model, *spec.models], spec.inputs_on) if dataflow else None
        self.evaluator = Evaluator(self.model, tokenizer, spec.evaluation.tasks, include_paths(spec),
                                   batch_size=spec.evaluation.batch_size)
        gc.collect()
        gc.freeze()  # the model, tasks and cached requests live as long as the worker: keep them out of GC scans

    def doc_ids(self, task: str, role: str) -> list[int]:
        return self.evaluator.doc_ids(task, role)

    def inputs(self) -> str:
        """Where this worker keeps its inputs (one line)."""
        return (self.paths or self.merger).inputs.describe()

    def _score(self, recipe: RecipeForm, role: str, doc_ids: dict[str, Sequence[int]] | None) -> tuple[EvalResult,
                                                                                                   float, float]:
        start = time.perf_counter()
        self._apply(recipe)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        merged = time.perf_counter()
        result = self.evaluator.evaluate(role, doc_ids)
        nan = [t for t, s in result.scores.items() if not math.isfinite(s)]
        if nan:
            raise FloatingPointError(f"task {nan[0]} scored {result.scores[nan[0]]}")
        return result, merged - start, time.perf_counter() - merged

    def _apply(self, recipe: RecipeForm) -> None:
        """Build ``recipe`` in the live model with its engine; a weight merge first puts back the model's own
        blocks where a layer path replaced them."""
        if recipe.engine == "weights":
            if self.paths is not None:
                self.paths.restore()
            self.merger.apply(recipe)
        elif self.paths is None:
            raise SpecError("a layer path needs a worker built for a data-flow search (space.kind: dataflow)")
        else:
            self.paths.apply(recipe)

    @property
    def merger(self) -> LiveMerger:
        if self._merger is None:
            self._merger = LiveMerger(self.model, self.spec.base_model, self.spec.models,
                                      tokenizer_source=self.spec.tokenizer_source, inputs_on=self.spec.inputs_on)
        return self._merger

    def run(self, job: Job) -> Outcome:
        """Do one job; any failure (an exception, NaN scores, device out of memory) is returned, not raised,
        after freeing what it held, so the worker carries on with the next candidate."""
        try:
            return run_race(job, self._score, self.name)
        except Exception as err:  # noqa: BLE001 — a candidate's failure is data for the search, not a crash
            error = f"{type(err).__name__}: {err}"[:500]
            del err
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return Outcome(None, "full", None, 0.0, 0.0, self.name, error=error)


def check_device(requested: str) -> None:
    """A device this machine has, checked before compute (the in-process executor's device)."""
    try:
        device = torch.device(requested) if requested != "auto" else None
    except RuntimeError as err:
        raise SpecError(f"device {requested!r} is not a device name ({err})") from None
    if device is None or device.type == "cpu":
        return
    if device.type != "cuda":
        raise SpecError(f"device {requested!r}: only cpu, cuda, cuda:N and auto are supported")
    count = torch.cuda.device_count()
    if count == 0 or (device.index is not None and device.index >= count):
        raise SpecError(f"device {requested!r} is not available here ({count} CUDA device(s) visible)")
