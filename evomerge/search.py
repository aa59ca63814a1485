"""The search: an Optuna study driven by ask/tell, resumable from its storage, then a hold-out re-check.

Budget = finished candidate evaluations (full or screened); failed ones are retried a bounded number
of times and do not count; duplicates of an evaluated recipe reuse its score and do not count. A killed
process leaves its in-flight trial RUNNING in the study; the next start marks it failed and re-runs it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from evomerge.checkpoint import atomic_write_text, open_checkpoint
from evomerge.errors import SearchError, SpecError
from evomerge.evaluate import EvalResult
from evomerge.executors import InProcessExecutor, Scored
from evomerge.screening import SCREEN_ATTR, Screen
from evomerge.space import LayerLayout, SearchSpace
from evomerge.spec import Recipe, SearchSpec

STUDY_NAME = "evomerge"
MAX_RETRIES = 2
MAX_FAILURES_IN_ROW = 5
MAX_DUPLICATES_IN_ROW = 50


@dataclass(frozen=True)
class RunFolder:
    root: Path

    @property
    def spec(self) -> Path:
        return self.root / "spec.yaml"

    @property
    def log(self) -> Path:
        return self.root / "trials.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    def storage_url(self, override: str | None = None) -> str:
        return override or f"sqlite:///{(self.root / 'study.db').resolve()}"

    def load_study(self, storage: str | None = None) -> optuna.Study:
        """The run's existing study (for reading: status, report, export)."""
        return optuna.load_study(study_name=STUDY_NAME, storage=self.storage_url(storage))

    def read_summary(self) -> dict[str, Any] | None:
        """What ``Search.finalize`` wrote, or None before the search finished."""
        return json.loads(self.summary.read_text()) if self.summary.exists() else None


def spec_hash(spec: SearchSpec) -> str:
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:16]


def recipe_hash(recipe: Recipe) -> str:
    return hashlib.sha256(recipe.model_dump_json().encode()).hexdigest()[:16]


def default_run_name(spec_path: str | None) -> str:
    stem = Path(spec_path).stem if spec_path else "demo"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_spec(spec: SearchSpec) -> None:
    """Everything that can fail before compute: model folders, their compatibility, the task names."""
    from evomerge.checkpoint import check_compatible
    from evomerge.evaluate import find_tasks
    from evomerge.executors import include_paths

    check_compatible([open_checkpoint(spec.base_model)] + [open_checkpoint(m) for m in spec.models])
    find_tasks([t.name for t in spec.evaluation.tasks], include_paths(spec))


def prepare_run(spec: SearchSpec, run: RunFolder, budget: int, force: bool) -> None:
    """Create the run folder or check that it was made by the same spec (refused unless forced)."""
    digest = spec_hash(spec)
    if run.spec.exists():
        old = yaml.safe_load(run.spec.read_text()) or {}
        if old.get("spec_hash") != digest and not force:
            raise SpecError(f"run {run.root} was made with a different spec; use another --run or pass --force")
    run.root.mkdir(parents=True, exist_ok=True)
    doc = {"spec_hash": digest, "budget": budget, "spec": spec.model_dump(mode="json")}
    atomic_write_text(run.spec, yaml.safe_dump(doc, sort_keys=False))


def load_run(run: RunFolder) -> tuple[SearchSpec, int]:
    """The spec and budget a run folder was made with."""
    if not run.spec.exists():
        raise SpecError(f"{run.root} is not a run folder (no spec.yaml)")
    doc = yaml.safe_load(run.spec.read_text())
    return SearchSpec.model_validate(doc["spec"]), int(doc["budget"])


def make_sampler(spec: SearchSpec) -> optuna.samplers.BaseSampler:
    kind = spec.sampler or default_sampler(spec)
    if kind == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=spec.seed, warn_independent_sampling=False)
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=spec.seed, multivariate=True, group=True)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=spec.seed)
    return optuna.samplers.RandomSampler(seed=spec.seed)


def default_sampler(spec: SearchSpec) -> str:
    if spec.evaluation.objective == "pareto":
        return "nsga2"
    return "tpe" if len(spec.space.methods) > 1 else "cmaes"


def open_study(spec: SearchSpec, run: RunFolder, storage: str | None = None) -> optuna.Study:
    directions = ["maximize"] * (len(spec.evaluation.tasks) if spec.evaluation.objective == "pareto" else 1)
    with warnings.catch_warnings():  # TPE's group is "experimental"; used knowingly
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = make_sampler(spec)
    return optuna.create_study(study_name=STUDY_NAME, storage=run.storage_url(storage), sampler=sampler,
                               pruner=optuna.pruners.NopPruner(), directions=directions, load_if_exists=True)


def _screens(spec: SearchSpec) -> bool:
    return spec.evaluation.screen_examples is not None and spec.evaluation.objective == "weighted"


def counted(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial uses up budget: a finished evaluation that was not a duplicate."""
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) and "duplicate_of" not in trial.user_attrs


def recover_interrupted(study: optuna.Study) -> int:
    """Trials a killed process left RUNNING: mark them failed and queue their parameters again."""
    stale = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    for t in stale:
        study.tell(t.number, state=TrialState.FAIL)
        if t.params:
            study.enqueue_trial(t.params, user_attrs={k: v for k, v in t.user_attrs.items()
                                                      if k in ("baseline",)} | {"rerun_of": t.number})
    return len(stale)


def _mean_scores(spec: SearchSpec, examples: dict[str, dict[int, float]]) -> EvalResult:
    scores = {t: sum(v.values()) / len(v) for t, v in examples.items()}
    return EvalResult(scores, examples, {t.name: t.weight for t in spec.evaluation.tasks})


def weighted_score(spec: SearchSpec, scores: dict[str, float]) -> float:
    """The spec's weighted mean of per-task scores (the single objective; the ranking of a Pareto front)."""
    weights = {t.name: t.weight for t in spec.evaluation.tasks}
    return sum(weights[k] * v for k, v in scores.items()) / sum(weights.values())


def _objective(spec: SearchSpec, result: EvalResult) -> list[float]:
    if spec.evaluation.objective == "pareto":
        return [result.scores[t.name] for t in spec.evaluation.tasks]
    return [result.score]


def _best_full(seen: dict[str, tuple[int, list[float], str | None]]) -> float | None:
    """Best value among full-fidelity evaluations (single objective), from the search's in-memory record of
    evaluated recipes: the progress display asks after every trial, so no storage query."""
    return max((values[0] for _, values, fidelity in seen.values() if fidelity == "full" and len(values) == 1),
               default=None)


@dataclass
class Progress:
    done: int
    budget: int
    best: float | None


class Search:
    """One run folder's search: ask, sample, evaluate (screen, then full), tell, log."""

    def __init__(self, spec: SearchSpec, run: RunFolder, storage: str | None = None,
                 executor: Any | None = None) -> None:
        self.spec = spec
        self.run = run
        self.study = open_study(spec, run, storage)
        self.space = SearchSpace(spec, LayerLayout.of(open_checkpoint(spec.base_model)))
        self.executor = executor or InProcessExecutor(spec)
        ev = spec.evaluation
        names = [t.name for t in ev.tasks]
        self.search_ids = {n: self.executor.doc_ids(n, "search")[: ev.search_examples] for n in names}
        self.screen = Screen({n: ids[: ev.screen_examples] for n, ids in self.search_ids.items()},
                             {t.name: t.weight for t in ev.tasks}, self.study.get_trials(deepcopy=False)) \
            if _screens(spec) else None

    # ------------------------------------------------------------------ the loop

    def seed_baselines(self) -> None:
        if not self.study.get_trials(deepcopy=False):
            for label, params in self.space.baselines():
                self.study.enqueue_trial(params, user_attrs={"baseline": label}, skip_if_exists=True)

    def finished(self) -> int:
        return sum(counted(t) for t in self.study.get_trials(deepcopy=False))

    def run_budget(self, budget: int, on_progress: Callable[[Progress], None] | None = None) -> None:
        recover_interrupted(self.study)
        self.seed_baselines()
        seen = {t.user_attrs["recipe_hash"]: (t.number, t.values, t.user_attrs.get("fidelity"))
                for t in self.study.get_trials(deepcopy=False)
                if t.state == TrialState.COMPLETE and "recipe_hash" in t.user_attrs}
        done, failures, duplicates = self.finished(), 0, 0
        while done < budget:
            if on_progress:
                on_progress(Progress(done, budget, _best_full(seen)))
            trial = self.study.ask()
            recipe = self.space.sample(trial)
            key = recipe_hash(recipe)
            trial.set_user_attr("recipe_hash", key)
            if key in seen:
                duplicates += 1
                if duplicates >= MAX_DUPLICATES_IN_ROW:
                    self.study.tell(trial, state=TrialState.FAIL)
                    raise SearchError(f"{duplicates} duplicate recipes in a row: the space looks exhausted")
                number, values, fidelity = seen[key]
                trial.set_user_attr("duplicate_of", number)
                trial.set_user_attr("fidelity", fidelity)
                self.study.tell(trial, values)
                continue
            duplicates = 0
            trial.set_user_attr("recipe", recipe.model_dump(mode="json", exclude_defaults=True))
            start = time.perf_counter()
            try:
                result, fidelity, merge_s, eval_s = self._evaluate(trial, recipe)
            except SpecError:
                raise
            except Exception as err:  # a candidate that crashed: record, retry a bounded number of times
                failures += 1
                trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:500])
                self.study.tell(trial, state=TrialState.FAIL)
                retry = trial.user_attrs.get("retry", 0)
                if retry < MAX_RETRIES:
                    self.study.enqueue_trial(trial.params, user_attrs={"retry": retry + 1})
                self._log(trial.number, "fail", None, recipe, time.perf_counter() - start, error=str(err))
                if failures >= MAX_FAILURES_IN_ROW:
                    raise SearchError(f"{failures} candidate evaluations failed in a row; last error: "
                                      f"{type(err).__name__}: {err}") from err
                continue
            failures = 0
            values = _objective(self.spec, result)
            trial.set_user_attr("fidelity", fidelity)
            trial.set_user_attr("scores", result.scores)
            self.study.tell(trial, values)
            seen[key] = (trial.number, values, fidelity)
            done += 1
            self._log(trial.number, fidelity, result, recipe, time.perf_counter() - start,
                      merge_s=merge_s, eval_s=eval_s, baseline=trial.user_attrs.get("baseline"))
        if on_progress:
            on_progress(Progress(done, budget, _best_full(seen)))

    def _evaluate(self, trial: optuna.Trial, recipe: Recipe) -> tuple[EvalResult, str, float, float]:
        """Screen on the small subset (paired test against the best full trial), then the rest if promising."""
        if self.screen is None:
            scored = self.executor.score(recipe, "search", self.search_ids)
            return scored.result, "full", scored.merge_s, scored.eval_s
        first = self.executor.score(recipe, "search", self.screen.doc_ids)
        vector = self.screen.vector(first.result)
        trial.set_user_attr(SCREEN_ATTR, vector)
        merge_s, eval_s = first.merge_s, first.eval_s
        if self.screen.prunes(vector):
            return first.result, "screen", merge_s, eval_s
        result = first.result
        rest_ids = {t: ids[len(self.screen.doc_ids[t]):] for t, ids in self.search_ids.items()}
        if any(rest_ids.values()):
            rest: Scored = self.executor.score(recipe, "search", rest_ids)
            result = _mean_scores(self.spec, {t: {**result.examples[t], **rest.result.examples[t]} for t in rest_ids})
            merge_s, eval_s = merge_s + rest.merge_s, eval_s + rest.eval_s
        self.screen.record(result.score, vector)
        return result, "full", merge_s, eval_s

    def _log(self, number: int, state: str, result: EvalResult | None, recipe: Recipe, seconds: float,
             **extra: Any) -> None:
        """Append one JSON line per trial (a line cut by a kill is skipped by readers)."""
        row = {"trial": number, "state": state, "score": result.score if result else None,
               "scores": result.scores if result else None, "seconds": round(seconds, 4),
               "worker": self.executor.name, "recipe": recipe.model_dump(mode="json", exclude_defaults=True),
               **{k: v for k, v in extra.items() if v is not None}}
        with self.run.log.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    # ------------------------------------------------------------------ the hold-out re-check

    def candidates(self) -> list[optuna.trial.FrozenTrial]:
        """The top-k full-fidelity trials (the Pareto front, ranked by weighted score, for pareto)."""
        full = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.user_attrs.get("fidelity") == "full" and "duplicate_of" not in t.user_attrs]
        if self.spec.evaluation.objective == "pareto":
            front = {t.number for t in self.study.best_trials}
            full = [t for t in full if t.number in front]
        return sorted(full, key=lambda t: weighted_score(self.spec, t.user_attrs["scores"]),
                      reverse=True)[: self.spec.evaluation.top_k]

    def reference_recipes(self) -> dict[str, Recipe]:
        """What the winner is compared with: each parent alone and their uniform average."""
        spec = self.spec
        refs = {f"parent {m}": Recipe(merge_method="linear", models=[{"model": m}], dtype=spec.dtype)
                for m in spec.models}
        refs["uniform average"] = Recipe(merge_method="linear", models=[{"model": m} for m in spec.models],
                                         dtype=spec.dtype)
        return refs

    def finalize(self) -> dict[str, Any]:
        """Re-score the top-k on validation, pick the winner there, report test scores and margins."""
        candidates = self.candidates()
        if not candidates:
            raise SearchError("no trial finished at full fidelity; nothing to choose from")
        validation = {t.number: self.executor.score(_recipe_of(t), "validation").result for t in candidates}
        winner = max(candidates, key=lambda t: validation[t.number].score)
        rows: dict[str, dict[str, Any]] = {}
        test_results: dict[str, EvalResult] = {}
        entries = {f"winner (trial {winner.number})": _recipe_of(winner), **self.reference_recipes()}
        for label, recipe in entries.items():
            val = validation[winner.number] if label.startswith("winner") else \
                self.executor.score(recipe, "validation").result
            test = self.executor.score(recipe, "test").result
            test_results[label] = test
            rows[label] = {"validation": val.score, "test": test.score, "validation_tasks": val.scores,
                           "test_tasks": test.scores}
        winner_label = next(iter(entries))
        summary = {
            "winner_trial": winner.number,
            "winner_recipe": _recipe_of(winner).model_dump(mode="json", exclude_defaults=True),
            "search_score": winner.user_attrs["scores"],
            "candidates_validation": {str(n): r.score for n, r in validation.items()},
            "table": rows,
            "margin_vs_uniform_average": paired_margin(test_results[winner_label],
                                                       test_results["uniform average"]),
            "finished_trials": self.finished(),
        }
        atomic_write_text(self.run.summary, json.dumps(summary, indent=2))
        return summary


def summary_table_markdown(table: dict[str, dict[str, Any]]) -> list[str]:
    """The winner-vs-references table of a summary as Markdown lines (report page, model card)."""
    return ["| model | validation | test |", "|---|---|---|",
            *(f"| {label} | {row['validation']:.4f} | {row['test']:.4f} |" for label, row in table.items())]


def describe_margin(margin: dict[str, float]) -> str:
    return (f"winner - uniform average on test: {margin['mean']:+.4f} (95% CI {margin['ci95_low']:+.4f} .. "
            f"{margin['ci95_high']:+.4f})")


def _recipe_of(trial: optuna.trial.FrozenTrial) -> Recipe:
    return Recipe.model_validate(trial.user_attrs["recipe"])


def paired_margin(a: EvalResult, b: EvalResult) -> dict[str, float]:
    """Mean weighted per-example difference a - b with a 95% normal interval (paired, same documents)."""
    diffs: list[float] = []
    weights: list[float] = []
    total = sum(a.weights.values())
    for task, per_doc in a.examples.items():
        n = len(per_doc)
        for doc, value in per_doc.items():
            diffs.append(value - b.examples[task][doc])
            weights.append(a.weights[task] / total / n)
    mean = sum(w * d for w, d in zip(weights, diffs, strict=True))
    variance = sum(w * w * (d - mean) ** 2 for w, d in zip(weights, diffs, strict=True)) * len(diffs) / max(
        1, len(diffs) - 1)
    half = 1.96 * math.sqrt(variance)
    return {"mean": mean, "ci95_low": mean - half, "ci95_high": mean + half}
