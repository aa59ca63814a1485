"""lm-eval on a live model: tasks built once, then per candidate only the documents asked for.

The model is wrapped once in lm-eval's ``HFLM``; in-place weight changes are seen by the next call
because nothing caches model outputs. Each task is loaded once per split role (search / validation /
test) from its own YAML with that split as its ``test_split``; per call ``lm_eval.evaluator.evaluate``
runs on the chosen doc ids with ``log_samples`` so every example's score comes back (for pruning). A task
may be an lm-eval group: its YAML tasks are loaded and scored as single tasks are, and its score is lm-eval's
aggregate of theirs (``aggregate_metric_list``).
Everything that reaches into lm-eval beyond its public API sits in one section at the end of this file.
"""

from __future__ import annotations

import functools
import inspect
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import torch

from evomerge.errors import SpecError

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager
from evomerge.scores import weighted_mean
from evomerge.spec import TaskSpec, parse_split
from evomerge.yaml_io import read_yaml_file

ROLES = ("search", "validation", "test")
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed (simple_evaluate and its CLI)


@dataclass
class EvalResult:
    """Scores of one candidate: per task, the weighted mean, and per example (keyed by doc id).

    An lm-eval group's examples are its tasks' examples laid end to end under group-wide doc ids. With
    lm-eval's ``weight_by_size: true`` the group score (the size-weighted mean of its tasks' scores) is the
    plain mean of those examples, as for a single task; with ``weight_by_size: false`` (the mean of its tasks'
    scores) each task's examples share an equal part, and ``strata`` maps the group's doc ids to their task."""

    scores: dict[str, float]
    examples: dict[str, dict[int, float]]
    weights: dict[str, float]
    strata: dict[str, dict[int, str]] = field(default_factory=dict)
    # per example, how surely the right answer was given where the responses show it (``evidence``)
    evidence: dict[str, dict[int, float]] = field(default_factory=dict)

    @property
    def score(self) -> float:
        return weighted_mean(self.scores, self.weights)

    def example_weights(self, task: str, doc_ids: Iterable[int]) -> dict[int, float]:
        """Each example's share of ``task``'s score over ``doc_ids`` (the shares sum to 1): equal, or in a group
        that weighs its tasks equally, an equal part per task split equally among that task's examples."""
        ids = list(doc_ids)
        strata = self.strata.get(task)
        if strata is None:
            return dict.fromkeys(ids, 1 / len(ids))
        sizes = Counter(strata[d] for d in ids)
        return {d: 1 / (len(sizes) * sizes[strata[d]]) for d in ids}

    def merged(self, other: EvalResult) -> EvalResult:
        """This result and ``other`` (the same weights scored on other documents of the same role) as one result
        on all of their documents; each task's score is then the weighted mean of its examples."""
        examples = {t: {**self.examples.get(t, {}), **other.examples.get(t, {})}
                    for t in {**self.examples, **other.examples}}
        strata = {t: {**self.strata.get(t, {}), **other.strata.get(t, {})} for t in {**self.strata, **other.strata}}
        evidence = {t: {**self.evidence.get(t, {}), **other.evidence.get(t, {})}
                    for t in {**self.evidence, **other.evidence}}
        result = EvalResult({}, examples, self.weights, strata, evidence)
        result.scores = {t: sum(w * per_doc[d] for d, w in result.example_weights(t, per_doc).items())
                         for t, per_doc in examples.items()}
        return result


def _split_of(task: TaskSpec, role: str) -> str:
    """The split (or doc range) a task reads in a role; a role the spec leaves out reads the split of its name."""
    return task.splits.get(role, role)


def check_tasks(tasks: Sequence[TaskSpec], include_paths: Sequence[str | Path] = (),
                tokenizer: str | Path | None = None) -> None:
    """Every task problem found before any model is loaded: in the task folders, a YAML file that is broken or
    not a regular file and a task name defined twice; in the YAML files, an unknown task, metric or split, a
    missing local data file, an empty doc range or (local JSONL) one past the end, duplicate tasks, task options
    the task cannot take, a template that does not parse; for a group, a group without an aggregated score and
    each of these on every task of the group. Tasks whose data are local files are then loaded as lm-eval loads
    them and every document rendered (data that cannot be read, a field a document lacks). With ``tokenizer`` (a
    model folder or Hub id), also a chat template asked of a tokenizer without one (only the tokenizer is
    loaded). A SpecError of one line names the first."""
    manager, plans = find_tasks(tasks, include_paths)
    _check_configs(plans)
    _check_documents(manager, plans)
    if tokenizer is not None and any(t.apply_chat_template for t in tasks):
        from transformers import AutoTokenizer

        try:
            loaded = AutoTokenizer.from_pretrained(tokenizer)
        except (OSError, ValueError) as err:
            raise SpecError(f"the tokenizer of {tokenizer} cannot be loaded for apply_chat_template: "
                            f"{str(err).splitlines()[0]}") from None
        _check_chat_template(tasks, loaded)


def _check_chat_template(tasks: Sequence[TaskSpec], tokenizer) -> None:
    """apply_chat_template needs a tokenizer with a chat template (HFLM would fail on the first prompt)."""
    chat = [t.name for t in tasks if t.apply_chat_template]
    if chat and not getattr(tokenizer, "chat_template", None):
        raise SpecError(f"task {chat[0]} sets apply_chat_template, but the model's tokenizer has no chat template")


@dataclass(frozen=True)
class TaskPlan:
    """A spec task as lm-eval runs it: its YAML tasks, each with its own spec and config. A single task is its
    own one; a group's are its tasks in lm-eval's order (nested groups flattened, as lm-eval aggregates every
    task under a group), each with the spec task's options and splits and the group's ``metric,filter`` key,
    and ``weight_by_size`` is lm-eval's for that key (None: not a group)."""

    task: TaskSpec
    leaves: list[tuple[TaskSpec, dict]]
    weight_by_size: bool | None = None

    @property
    def is_group(self) -> bool:
        return self.weight_by_size is not None


class _NotFound(SpecError):
    """A task that the TaskManager's index lacks (another index may have it)."""


def find_tasks(tasks: Sequence[TaskSpec], include_paths: Sequence[str | Path] = ()) -> tuple[TaskManager,
                                                                                             list[TaskPlan]]:
    """A TaskManager that knows every task named and every task their groups list, and each task's plan: the
    include paths alone when they suffice (fast), else with lm-eval's bundled registry; SpecError naming the
    first task found nowhere."""
    from lm_eval.tasks import TaskManager

    _quiet_lm_eval()
    paths = [str(p) for p in include_paths]
    missing = [p for p in paths if not Path(p).is_dir()]
    if missing:
        raise SpecError(f"task folder not found: {missing[0]}")
    _check_task_folders([Path(p) for p in paths])
    manager = TaskManager(include_path=paths or None, include_defaults=False)
    try:
        return manager, [_plan(manager, t) for t in tasks]
    except _NotFound:
        manager = TaskManager(include_path=paths or None, include_defaults=True)
        return manager, [_plan(manager, t) for t in tasks]


def _plan(manager: TaskManager, task: TaskSpec) -> TaskPlan:
    """A spec task's plan from its YAML (no dataset loaded). A group must aggregate the spec's metric (lm-eval
    gives a group without ``aggregate_metric_list`` no score); its tasks are then checked for that key."""
    built = _build_configs(manager, task.name)
    if isinstance(built, _LeafConfig):
        return TaskPlan(task, [(task, built.config)])
    if not built.aggregate_metric_list:
        raise SpecError(f"group {task.name} has no aggregate_metric_list, so lm-eval gives it no score; add one "
                        "(metric, aggregation: mean, weight_by_size) to its YAML")
    leaves = _group_leaves(built)
    keys = _group_keys(built.aggregate_metric_list,
                       [_result_keys(_config_metrics(leaf.config), leaf.config.get("filter_list")) for leaf in leaves])
    metric, filter_name = _result_key(task, list(keys))
    key = f"{metric},{filter_name}"
    return TaskPlan(task, [(task.model_copy(update={"name": leaf.task_name, "metric": key}), leaf.config)
                           for leaf in leaves], keys[key])


def _group_keys(aggregations: Sequence, leaf_keys: Sequence[Sequence[str]]) -> dict[str, bool]:
    """A group's results keys (``metric,filter``) as lm-eval's ``Group.aggregate`` makes them, each with its
    ``weight_by_size`` (a later entry for the same key wins, as there): every filter an aggregation names, else
    the filters its metric has in the group's tasks (``none`` where none has it, so that the check of the
    tasks names what they lack)."""
    keys: dict[str, bool] = {}
    for agg in aggregations:
        if not isinstance(agg.aggregation, str):  # lm-eval takes a !function too; we score means only
            raise SpecError(f"aggregate_metric_list: {agg.metric}'s aggregation is a Python function; only mean "
                            "is supported")
        found = sorted({k.partition(",")[2] for keys_ in leaf_keys for k in keys_ if k.partition(",")[0] == agg.metric})
        for filter_name in agg.filter_list if agg.filter_list is not None else found or ["none"]:
            keys[f"{agg.metric},{filter_name}"] = agg.weight_by_size
    return keys


@contextmanager
def _in_group(plan: TaskPlan) -> Iterator[None]:
    """A problem of a group's task names the group first."""
    try:
        yield
    except SpecError as err:
        if not plan.is_group:
            raise
        raise SpecError(f"group {plan.task.name}: {err}") from None


def _check_configs(plans: Sequence[TaskPlan]) -> None:
    """The checks of ``check_tasks`` on the tasks' YAML configs."""
    names = [p.task.name for p in plans]
    twice = [n for n in names if names.count(n) > 1]
    if twice:
        raise SpecError(f"task {twice[0]} is listed twice in evaluation.tasks")
    owners: dict[str, str] = {}
    for plan in plans:
        owner = f"group {plan.task.name}" if plan.is_group else "evaluation.tasks"
        for leaf, _ in plan.leaves:
            if leaf.name in owners:
                raise SpecError(f"task {leaf.name} is listed twice (by {owners[leaf.name]} and {owner}); "
                                "lm-eval scores a task once")
            owners[leaf.name] = owner
    for plan in plans:
        with _in_group(plan):
            for task, config in plan.leaves:
                _check_config(task, config)


def _check_config(task: TaskSpec, config: dict) -> None:
    """The checks of ``check_tasks`` on one YAML task's config."""
    _result_key(task, _result_keys(_config_metrics(config), config.get("filter_list")))
    _check_options(task, config)
    files = _data_files(config)  # None: a dataset from the Hub, whose splits and sizes show once downloaded
    local = [p for paths in (files or {}).values() for p in paths if _is_local(p)]
    missing = [p for p in local if not Path(p).exists()]
    if missing:
        raise SpecError(f"task {task.name}: data file not found: {missing[0]}")
    special = [p for p in local if not Path(p).is_file()]  # a FIFO would block the reader, a folder holds no rows
    if special:
        raise SpecError(f"task {task.name}: data file {special[0]} is not a regular file")
    for role in ROLES:
        split = parse_split(_split_of(task, role))[0]
        if files is not None and split not in files:
            raise SpecError(f"task {task.name} has no split {split!r} (splits.{role}); it has: {', '.join(files)}")
        _check_range(task, role, None if files is None else _count_docs(task, files[split], config))
        shots = _fewshot_split(task, config, split)
        if shots is not None and files is not None and shots not in files:
            raise SpecError(f"task {task.name} draws few-shot examples from split {shots!r}, which it lacks; "
                            f"it has: {', '.join(files)}")


def _check_options(task: TaskSpec, config: dict) -> None:
    """lm-eval task options that the task's YAML rules out."""
    output_type = config.get("output_type", "generate_until")
    if task.gen_kwargs is not None and output_type != "generate_until":
        raise SpecError(f"task {task.name}: gen_kwargs apply to generate_until tasks only; it is {output_type}")
    if task.num_fewshot is not None and config.get("num_fewshot") == 0:
        raise SpecError(f"task {task.name} fixes num_fewshot: 0 in its YAML; lm-eval ignores a num_fewshot for it")


def _num_fewshot(task: TaskSpec, config: dict) -> int:
    """The few-shot examples per prompt as lm-eval's ``simple_evaluate`` settles them: the spec's number, else
    the YAML's, else 0 (a YAML's 0 is never overridden)."""
    if task.num_fewshot is not None and config.get("num_fewshot") != 0:
        return task.num_fewshot
    return config.get("num_fewshot") or 0


def _fewshot_split(task: TaskSpec, config: dict, split: str) -> str | None:
    """Where a role reading ``split`` draws few-shot examples (None: none, or the YAML's own hard-coded
    ``fewshot_config.samples``, which a split would override in lm-eval): lm-eval's order, the YAML's
    fewshot_config split, fewshot_split, training_split, validation_split, else the evaluated split itself
    (each document then left out of its own examples, as lm-eval does)."""
    if _num_fewshot(task, config) == 0:
        return None
    fewshot = config.get("fewshot_config") or {}
    explicit = fewshot.get("split") or config.get("fewshot_split") or config.get("training_split") \
        or config.get("validation_split")
    if explicit is None and fewshot.get("samples") is not None:
        return None
    return explicit or split


def _check_range(task: TaskSpec, role: str, size: int | None) -> None:
    """A doc range must select documents, and (where the split's size is known) lie within the split."""
    split, ids = parse_split(_split_of(task, role))
    where = f"task {task.name} splits.{role} {_split_of(task, role)!r}"
    if ids.stop is not None and (ids.start or 0) >= ids.stop:
        raise SpecError(f"{where} selects no documents")
    if size is not None and ids.stop is not None and ids.stop > size:
        raise SpecError(f"{where} reaches past the end of split {split!r} ({size} documents)")
    if size is not None and not range(size)[ids]:
        raise SpecError(f"{where} selects no documents (split {split!r} has {size})")


def _result_key(task: TaskSpec, keys: Sequence[str]) -> tuple[str, str]:
    """(metric, filter) of lm-eval's results key ``metric,filter`` that a task's ``metric`` names: either that
    key, or a metric name alone when the task has it under one filter only (``none`` without a filter_list)."""
    if "," in task.metric:
        chosen = [task.metric] if task.metric in keys else []
    else:
        chosen = [k for k in keys if k.partition(",")[0] == task.metric]
    if len(chosen) == 1:
        metric, _, filter_name = chosen[0].partition(",")
        return metric, filter_name
    if chosen:
        raise SpecError(f"task {task.name} has metric {task.metric!r} under several filters; name one of: "
                        f"{', '.join(chosen)}")
    offered = ", ".join(k.removesuffix(",none") for k in keys)
    raise SpecError(f"task {task.name} has no metric {task.metric!r}; it has: {offered}")


def _result_keys(metrics: Iterable[str], filter_list: Sequence[dict] | None) -> list[str]:
    """A task's results keys as lm-eval writes them: ``metric,filter`` for every metric under every filter."""
    filters = [f["name"] for f in filter_list or ()] or ["none"]
    return [f"{metric},{name}" for name in filters for metric in dict.fromkeys(metrics)]


def _data_files(config: dict) -> dict[str, list[str]] | None:
    """A task's local data files per split (a single file or list is the split ``train``, as in ``datasets``);
    None for a dataset without ``data_files``."""
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if files is None:
        return None
    if not isinstance(files, dict):
        files = {"train": files}
    return {split: [paths] if isinstance(paths, str) else list(paths) for split, paths in files.items()}


def _is_local(path: str) -> bool:
    """A plain local path (not a URL or a glob pattern)."""
    return "://" not in path and not any(c in path for c in "*?[")


def _count_docs(task: TaskSpec, paths: Sequence[str], config: dict) -> int | None:
    """Documents in a split when cheap to know: local JSONL files read as they are (one document a line). Every
    local JSONL file is read, so that a line that is no JSON object is named here (``datasets`` names neither
    the file nor the line)."""
    counts = [_jsonl_docs(task, p) for p in paths if _is_local(p) and p.endswith(".jsonl")]
    plain = not config.get("process_docs") and "field" not in (config.get("dataset_kwargs") or {})
    return sum(counts) if plain and len(counts) == len(paths) else None


def _jsonl_docs(task: TaskSpec, path: str) -> int:
    """The documents of a task's JSONL file; SpecError naming the file and line of one that is no JSON object."""
    import json

    docs = 0
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line.decode("utf-8-sig"))  # UTF-8 (after a byte-order mark), as datasets reads it
            except ValueError as err:  # UnicodeDecodeError included
                raise SpecError(f"task {task.name}: {path} line {number} is not a JSON line ({err})") from None
            if not isinstance(doc, dict):
                raise SpecError(f"task {task.name}: {path} line {number} is a JSON {type(doc).__name__}, not an "
                                "object (a document)")
            docs += 1
    return docs


class Evaluator:
    """Scores the current weights of one live model on named tasks (YAML tasks or lm-eval groups); built once
    per worker."""

    def __init__(self, model: torch.nn.Module, tokenizer, tasks: Sequence[TaskSpec],
                 include_paths: Sequence[str | Path] = (), batch_size: int | str = 64) -> None:
        self.tasks = {t.name: t for t in tasks}
        manager, plans = find_tasks(tasks, include_paths)
        _check_configs(plans)
        _check_chat_template(tasks, tokenizer)
        self._plans = {p.task.name: p for p in plans}
        max_length = getattr(model.config, "max_position_embeddings", None)
        self.lm = _fast_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        self._loaded: dict[str, dict] = {}
        self._doc_ids: dict[tuple[str, str], list[int]] = {}
        self._members: dict[tuple[str, str], list[tuple[str, int]]] = {}  # a group's doc id -> (its task, doc id)
        self._positions: dict[tuple[str, str], dict[tuple[str, int], int]] = {}  # and back
        self._keys: dict[str, tuple[str, str]] = {}
        with _quiet_datasets():
            self._load_roles(manager, plans)

    def _load_roles(self, manager: TaskManager, plans: Sequence[TaskPlan]) -> None:
        """Each role's YAML tasks loaded with that role's split as their test split, lm-eval's task options set
        as ``simple_evaluate`` sets them, documents and requests built; each group's doc ids laid out."""
        leaves = [leaf for plan in plans for leaf in plan.leaves]
        for role in ROLES:
            specs = []
            for t, config in leaves:
                split = parse_split(_split_of(t, role))[0]
                specs.append(_as_split(config, self.task_key(t.name, role), split, _fewshot_split(t, config, split)))
            self._loaded[role] = _load_tasks(manager, specs, [t for t, _ in leaves], role)
            for plan in plans:
                with _in_group(plan):
                    for task, config in plan.leaves:
                        self._prepare(self._loaded[role]["tasks"][self.task_key(task.name, role)], task, config, role)
                if plan.is_group:
                    self._lay_out(plan, role)

    def _prepare(self, built, task: TaskSpec, config: dict, role: str) -> None:
        """One loaded task made ready for repeated scoring, and checked where only loading shows a problem."""
        _set_options(built, task, config)
        # the loaded task is the truth: a Python-built metric or a Hub dataset's size shows only here
        self._keys[task.name] = _result_key(task, _result_keys(built.aggregation(), built.config.filter_list))
        _materialize_docs(built)
        _cache_requests(built, system_instruction=task.system_instruction,
                        apply_chat_template=bool(task.apply_chat_template), fewshot_as_multiturn=task.multiturn,
                        chat_template=self.lm.apply_chat_template if task.apply_chat_template else None)
        size = len(built.test_docs())
        _check_range(task, role, size)
        self._doc_ids[(task.name, role)] = list(range(size))[parse_split(_split_of(task, role))[1]]

    def _lay_out(self, plan: TaskPlan, role: str) -> None:
        """A group's doc ids in a role: positions in its tasks' documents laid end to end (in lm-eval's task
        order), listed so that every prefix draws from each task in proportion to its weight in the group score
        (its size, or equal shares; a task whose documents run out drops out). A search scores a group on the
        first ``search_examples`` (screening: ``screen_examples``) of them, so a prefix is a stratified sample."""
        ids = [self._doc_ids[(task.name, role)] for task, _ in plan.leaves]
        members = [(task.name, d) for (task, _), docs in zip(plan.leaves, ids, strict=True) for d in docs]
        self._members[(plan.task.name, role)] = members
        self._positions[(plan.task.name, role)] = {member: i for i, member in enumerate(members)}
        starts = list(accumulate((len(docs) for docs in ids), initial=0))
        order = sorted(((j + 0.5) / (len(docs) if plan.weight_by_size else 1), k, starts[k] + j)
                       for k, docs in enumerate(ids) for j in range(len(docs)))
        self._doc_ids[(plan.task.name, role)] = [position for *_, position in order]

    @staticmethod
    def task_key(name: str, role: str) -> str:
        return f"{name}@{role}"

    def doc_ids(self, task: str, role: str) -> list[int]:
        """All doc ids a role may use for a task (for a group, group-wide ids in the order a search takes them)."""
        return self._doc_ids[(task, role)]

    @torch.no_grad()
    def evaluate(self, role: str, doc_ids: dict[str, Sequence[int]] | None = None) -> EvalResult:
        """Score the model as it is now on ``role``'s documents (all of them, or ``doc_ids`` per task). A group's
        score is lm-eval's aggregate of its tasks' scores on the documents chosen from each (see EvalResult)."""
        from lm_eval.api.metrics import aggregate_subtask_metrics

        docs: dict[str, list[int]] = {}  # YAML task -> its chosen doc ids
        for name in self.tasks:
            for leaf, doc in self._leaf_docs(name, role, doc_ids[name] if doc_ids and name in doc_ids else
                                             self.doc_ids(name, role)):
                docs.setdefault(leaf, []).append(doc)
        leaf_scores, leaf_examples, leaf_evidence = self._score_leaves(role, docs)
        scores, examples, strata, evidence = {}, {}, {}, {}
        for name, plan in self._plans.items():
            present = [t.name for t, _ in plan.leaves if t.name in leaf_scores]
            if not present:
                continue
            if not plan.is_group:
                scores[name], examples[name] = leaf_scores[name], leaf_examples[name]
                if name in leaf_evidence:
                    evidence[name] = leaf_evidence[name]
                continue
            scores[name] = aggregate_subtask_metrics([leaf_scores[t] for t in present],
                                                     [len(leaf_examples[t]) for t in present], plan.weight_by_size)
            position = self._positions[(name, role)]
            examples[name] = {position[(t, d)]: v for t in present for d, v in leaf_examples[t].items()}
            if all(t in leaf_evidence for t in present):
                evidence[name] = {position[(t, d)]: v for t in present for d, v in leaf_evidence[t].items()}
            if not plan.weight_by_size:
                strata[name] = {position[(t, d)]: t for t in present for d in leaf_examples[t]}
        return EvalResult(scores, examples, {n: t.weight for n, t in self.tasks.items()}, strata, evidence)

    def _leaf_docs(self, name: str, role: str, ids: Iterable[int]) -> list[tuple[str, int]]:
        """(YAML task, doc id) of a spec task's doc ids: its own, or a group's mapped to its tasks' documents."""
        if not self._plans[name].is_group:
            return [(name, d) for d in ids]
        members = self._members[(name, role)]
        return [members[i] for i in ids]

    def _score_leaves(self, role: str, docs: dict[str, list[int]]) -> tuple[
            dict[str, float], dict[str, dict[int, float]], dict[str, dict[int, float]]]:
        """One lm-eval ``evaluate`` on the chosen documents of every YAML task that has some: each task's score,
        per-example scores (by its own doc ids) under the spec's metric and filter, and per-example evidence
        where every sample's responses show it."""
        from lm_eval.evaluator import evaluate

        samples = {self.task_key(leaf, role): DocIds(ids) for leaf, ids in docs.items() if ids}
        loaded = self._loaded[role]["tasks"]
        out = evaluate(self.lm, {"tasks": {key: loaded[key] for key in samples}}, samples=samples, log_samples=True,
                       bootstrap_iters=0)
        scores, examples, evidence = {}, {}, {}
        for leaf, ids in docs.items():
            if ids:
                key = self.task_key(leaf, role)
                metric, filter_name = self._keys[leaf]
                scores[leaf] = float(out["results"][key][f"{metric},{filter_name}"])
                samples = [s for s in out["samples"][key] if s["filter"] == filter_name]
                examples[leaf] = {int(s["doc_id"]): float(s[metric]) for s in samples}
                shown = {int(s["doc_id"]): answer_evidence(s) for s in samples}
                if all(v is not None for v in shown.values()):
                    evidence[leaf] = shown
        return scores, examples, evidence


def answer_evidence(sample: dict) -> float | None:
    """How surely a model gave a document's right answer, from lm-eval's logged responses: a loglikelihood
    task's log-probability of the target, a multiple-choice task's log-probability margin of the right choice
    over the best other; None where the responses do not show it (generated text, several right choices)."""
    resps = sample.get("filtered_resps")
    if not isinstance(resps, list) or not resps or not all(
            isinstance(r, tuple | list) and len(r) == 2 and isinstance(r[0], float) for r in resps):
        return None
    lls = [r[0] for r in resps]
    if len(lls) == 1:
        return lls[0]
    gold = sample.get("target")
    if isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(lls):
        return lls[gold] - max(lls[:gold] + lls[gold + 1:])
    return None


def _long_tensor(rows: Sequence[Sequence[int]], width: int, pad: int, device: torch.device) -> torch.Tensor:
    """Right-padded int64 matrix from token lists (via one flat buffer: ``torch.tensor`` on nested lists
    costs more than the small demo model's forward pass)."""
    flat = array("q")
    for row in rows:
        flat.extend(row)
        flat.extend([pad] * (width - len(row)))
    return torch.frombuffer(flat, dtype=torch.long).view(len(rows), width).to(device)


@torch.no_grad()
def score_continuations(model: torch.nn.Module, requests: Sequence[tuple[list[int], list[int]]], max_length: int,
                        batch_size: int, pad_id: int) -> list[tuple[float, bool]]:
    """(sum of continuation log-probs, every continuation token is the argmax) per (context, continuation)
    token pair: right-padded batches, longest first, one gather per batch instead of a loop per request.
    Requests whose model input is the same (a multiple-choice question's answers that differ only in their
    last token, as lm-eval's logits cache groups them) share one row of the batch. Only the continuation
    positions' logits are kept, so a large vocabulary costs no copy."""
    inputs, continuations = [], []
    for context, continuation in requests:
        whole = (context + continuation)[-(max_length + 1):]
        inputs.append(whole[:-1])
        continuations.append(whole[1:][-len(continuation):])  # at most what the kept input can predict
    rows: dict[tuple[int, ...], int] = {}  # distinct model input -> its row
    row_of = [rows.setdefault(tuple(x), len(rows)) for x in inputs]
    distinct = list(rows)
    members: list[list[int]] = [[] for _ in distinct]
    for i, row in enumerate(row_of):
        members[row].append(i)
    order = sorted(range(len(distinct)), key=lambda r: -len(distinct[r]))
    device = next(model.parameters()).device
    offsets = torch.arange(max(len(c) for c in continuations), device=device)
    keeps = "logits_to_keep" in inspect.signature(model.forward).parameters
    out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = len(distinct[batch[0]])
        done = [i for r in batch for i in members[r]]
        local = torch.tensor([j for j, r in enumerate(batch) for _ in members[r]], device=device)
        first = torch.tensor([len(inputs[i]) - len(continuations[i]) for i in done], device=device)
        # the head only where some request of the batch reads it (its rows are of similar length)
        low = int(first.min()) if keeps else 0
        kept = {"logits_to_keep": torch.arange(low, width, device=device)} if keeps else {}
        ids = _long_tensor([distinct[r] for r in batch], width, pad_id, device)
        logits = model(ids, use_cache=False, **kept).logits
        positions = (first.unsqueeze(1) + offsets).clamp(max=width - 1) - low
        picked = logits[local.unsqueeze(1), positions].float()  # (requests, longest continuation, vocab)
        targets = _long_tensor([continuations[i] for i in done], len(offsets), 0, device)
        valid = offsets < torch.tensor([len(continuations[i]) for i in done], device=device).unsqueeze(1)
        logprobs = (picked.gather(-1, targets.unsqueeze(-1)) - picked.logsumexp(-1, keepdim=True)).squeeze(-1)
        sums = (logprobs * valid).sum(dim=1).tolist()
        greedy = ((picked.argmax(-1) == targets) | ~valid).all(dim=1).tolist()
        for i, total, hit in zip(done, sums, greedy, strict=True):
            out[i] = (total, hit)
    return out


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars from ``datasets`` and ``huggingface_hub`` while tasks load (lm-eval's ``load_dataset``
    draws "Generating search split", "Map", "Downloading data" bars per task and split) and no warnings from
    their loggers; errors still raise. The progress bars' state is restored afterwards (an environment
    variable that forces them on or off keeps priority)."""
    import logging
    import warnings

    import datasets
    from huggingface_hub import utils as hub_utils

    loggers = [logging.getLogger(name) for name in ("datasets", "huggingface_hub")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():  # "Cannot disable progress bars: HF_..._DISABLE_PROGRESS_BARS=0 is set"
        warnings.simplefilter("ignore")
        datasets_on = not datasets.are_progress_bars_disabled()
        hub_on = not hub_utils.are_progress_bars_disabled()
        if datasets_on:
            datasets.disable_progress_bars()
        if hub_on:
            hub_utils.disable_progress_bars()
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.ERROR))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if datasets_on:
                datasets.enable_progress_bars()
            if hub_on:
                hub_utils.enable_progress_bars()


# ----------------------------------------------------------------------------------------------------------
# lm-eval internals. Everything below reaches past lm-eval's public API (``TaskManager``, ``simple_evaluate``,
# ``evaluator.evaluate``, ``HFLM``'s public methods): the task index's entries, the task factory (a group built
# with configs in place of tasks), ``TaskManager.load`` of config dicts, a Task's request building and document
# storage, how ``evaluate`` iterates ``samples``, the default metrics per output type, HFLM's private
# scoring and batch-size probe, the task index's walk of a folder and a YAML's kind, a Task's ``features`` and
# lm-eval's Jinja environment. Checked against lm-eval 0.4.12 (where the TaskManager rewrite, #3549, first
# shipped) and 0.4.13; 0.5.0.dev1 moves ``lm_eval/api/task.py`` and breaks them.
# ----------------------------------------------------------------------------------------------------------


def _quiet_lm_eval() -> None:
    """No logs or progress bars from lm-eval per candidate: the search draws its own progress."""
    import logging

    import lm_eval.api.task
    from tqdm import tqdm

    for name in ("lm-eval", "lm_eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    lm_eval.api.task.tqdm = functools.partial(tqdm, disable=True)


class _LeafConfig:
    """A YAML task as lm-eval's task factory configures it, in place of the Task it would build (building one
    loads its dataset): its name, its config (a group's overrides merged in) and its YAML file."""

    def __init__(self, config: dict, yaml_path: Path | None) -> None:
        self.task_name = config["task"]
        self.config = _local_files(config, yaml_path)


def _build_configs(manager, name: str):
    """A task's ``_LeafConfig``, or a group as lm-eval's factory builds it (members by name, tags, nested and
    inline groups, a group's overrides for its tasks) with ``_LeafConfig`` leaves: lm-eval's own rules, no
    dataset loaded. A name the index lacks, or a group's member that is no known task (or a task defined
    inside the group's YAML, which is not supported), is reported as not found."""
    from unittest import mock

    from lm_eval.tasks import _factory
    from lm_eval.tasks._index import Kind

    class ConfigFactory(_factory.TaskFactory):
        def _build_task(self, entry, overrides):
            config = self._load_full_config(entry, overrides)
            for key in ("tag", "group", "task_list"):  # as TaskFactory._build_task
                config.pop(key, None)
            return _LeafConfig(config, entry.yaml_path)

    def unknown(config: dict) -> NoReturn:  # TaskFactory builds a member it cannot find as an inline task
        group, _, name = config["task"].rpartition("::")
        raise _NotFound(f"group {group}: task {name!r} not found (is its folder in include_paths? a task defined "
                        "inside a group's YAML is not supported)")

    entry = manager.task_index.get(name)
    if entry is None:
        raise _NotFound(f"task {name!r} not found (is its folder in include_paths?)")
    if entry.kind not in (Kind.TASK, Kind.GROUP):
        raise SpecError(f"task {name!r} is an lm-eval {entry.kind.name.lower()}, not a YAML task or group; "
                        "name YAML tasks or groups")
    try:
        with mock.patch.object(_factory, "ConfigurableTask", unknown):
            return ConfigFactory().build(entry, registry=dict(manager.task_index))
    except ValueError as err:  # lm-eval's own refusal, e.g. an aggregation other than mean
        raise SpecError(f"task {name}: {str(err).splitlines()[0]}") from None


def _group_leaves(group) -> list[_LeafConfig]:
    """A group's YAML tasks, nested groups flattened, in lm-eval's order (``Group.get_all_tasks``)."""
    leaves = []
    for child in group:
        if not isinstance(child, _LeafConfig):
            leaves.extend(_group_leaves(child))
        elif "class" in child.config:
            raise SpecError(f"group {group.name}: task {child.task_name} is an lm-eval Python task, not a YAML task")
        else:
            leaves.append(child)
    return leaves


def _local_files(config: dict, yaml_path: Path | None) -> dict:
    """A task's config with relative local data files made absolute against its YAML's folder (plain lm-eval
    reads them against the working directory, which is kept where only it has the file)."""
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if files is None or yaml_path is None:
        return config
    folder = Path(yaml_path).parent

    def resolve(path: str) -> str:
        beside = folder / path
        return str(beside) if _is_local(path) and (beside.exists() or not Path(path).exists()) else path

    def resolve_all(paths: str | list[str]) -> str | list[str]:
        return resolve(paths) if isinstance(paths, str) else [resolve(p) for p in paths]

    resolved = {k: resolve_all(v) for k, v in files.items()} if isinstance(files, dict) else resolve_all(files)
    return {**config, "dataset_kwargs": {**config["dataset_kwargs"], "data_files": resolved}}


def _as_split(config: dict, key: str, split: str, fewshot: str | None) -> dict:
    """A task's config as lm-eval loads it under the name ``key``: ``split`` as its test split, few-shot examples
    drawn from ``fewshot``."""
    return {**config, "task": key, "test_split": split, "validation_split": None, "training_split": None,
            "fewshot_split": fewshot}


def _check_task_folders(roots: Sequence[Path]) -> None:
    """The task folders' YAML files read as lm-eval's index reads them (``include``s merged in), refused where it
    would pass over a problem silently: a file that is not a regular file (a FIFO blocks its reader), one that is
    no valid YAML or names a key twice, an include it cannot read (lm-eval skips such a file, and its task is
    then "not found"), and a task or group name that two files define (lm-eval would keep one)."""
    from lm_eval.tasks._index import TaskIndex

    defined: dict[str, Path] = {}
    for root in roots:
        for path in TaskIndex._iter_yaml_files(root):
            name = _defined_name(_task_yaml(path))
            if name is None:
                continue
            first = defined.setdefault(name, path)
            if first.resolve() != path.resolve():  # the same file reached through two include paths is one
                raise SpecError(f"task {name} is defined twice: in {first} and in {path} (lm-eval would silently "
                                "use one of them); rename one")


def _task_yaml(path: Path, including: frozenset[Path] = frozenset()):
    """A task YAML with its ``include``s merged in as lm-eval's ``load_yaml`` merges them (the file's own keys
    win; an include is named relative to the file), read strictly (``yaml_io``); ``including``: the files whose
    includes led here. A problem in an included file names the file that includes it too."""
    resolved = path.expanduser().resolve()
    config = read_yaml_file(path, functions=True)
    if not isinstance(config, dict) or "include" not in config:
        return config
    includes = config.pop("include")
    merged: dict = {}
    for name in includes if isinstance(includes, list) else [includes]:
        if not isinstance(name, str):
            raise SpecError(f"{path}: include {name!r} is not a file name")
        target = resolved.parent / name
        if target.resolve() in including | {resolved}:
            raise SpecError(f"{path}: include {name} leads back to itself (an include cycle)")
        try:
            included = _task_yaml(target, including | {resolved})
        except SpecError as err:
            raise SpecError(f"{path}: include {name}: {err}") from None
        if not isinstance(included, dict):
            raise SpecError(f"{path}: include {name} is not a YAML mapping")
        included.pop("task_list", None)  # as lm-eval: a task_list defines tasks for its own file only
        merged.update(included)
    return {**merged, **config}


def _defined_name(config) -> str | None:
    """The name lm-eval's index files a task YAML under (``TaskIndex._kind_of``); None: not a task YAML."""
    if not isinstance(config, dict):
        return None
    name = config.get("group") if "group" in config and "class" not in config else config.get("task")
    return name if isinstance(name, str) else None


TEMPLATES = ("doc_to_text", "doc_to_target", "doc_to_choice")  # what lm-eval renders per document


def _check_documents(manager, plans: Sequence[TaskPlan]) -> None:
    """Each YAML task as lm-eval will build it: its keys those of lm-eval's TaskConfig, its templates valid Jinja
    (unknown filters included); a task whose data are local files loaded as lm-eval loads it (each split it reads)
    and every document rendered. A worker would otherwise fail on them after the models are loaded."""
    import dataclasses

    from jinja2 import TemplateSyntaxError
    from lm_eval.api.task import TaskConfig
    from lm_eval.utils import env  # lm-eval's Jinja environment

    options = {f.name for f in dataclasses.fields(TaskConfig)}
    with _quiet_datasets():
        for plan in plans:
            with _in_group(plan):
                for task, config in plan.leaves:
                    entry = manager.task_index.get(task.name)
                    where = f"task {task.name}" + (f" ({entry.yaml_path})" if entry and entry.yaml_path else "")
                    unknown = sorted(set(config) - options)
                    if unknown:
                        raise SpecError(f"{where}: {unknown[0]!r} is not a key of an lm-eval task YAML")
                    for key in TEMPLATES:
                        if isinstance(config.get(key), str):
                            try:
                                env.from_string(config[key])
                            except TemplateSyntaxError as err:
                                raise SpecError(f"{where}: {key} is not a valid Jinja template (line {err.lineno}: "
                                                f"{err.message})") from None
                    files = _data_files(config)
                    if files is not None and all(_is_local(p) for paths in files.values() for p in paths):
                        _render_documents(manager, task, config, files, where)


def _render_documents(manager, task: TaskSpec, config: dict, files: dict[str, list[str]], where: str) -> None:
    """Every document of each split a task reads (its roles' and their few-shot examples'), loaded by lm-eval and
    rendered by the task's templates; the first problem (``_document_problem``) is named with its document, split
    and files. Any error here comes from the task's own data, templates or functions: each is one line."""
    from jinja2 import TemplateError, meta
    from lm_eval.utils import env

    splits = [parse_split(_split_of(task, role))[0] for role in ROLES]
    splits += [shots for split in splits if (shots := _fewshot_split(task, config, split)) is not None]
    templates = {k: config[k] for k in TEMPLATES if config.get(k) is not None}
    fields = {k: meta.find_undeclared_variables(env.parse(t)) for k, t in templates.items() if isinstance(t, str)}
    every = ", ".join(p for paths in files.values() for p in paths)
    for split in dict.fromkeys(splits):
        key, source = f"{task.name}@check", ", ".join(files[split])
        try:
            built = manager.load([_as_split(config, key, split, None)])["tasks"][key]
        except TemplateError as err:  # lm-eval renders the first document as it builds the task
            raise SpecError(f"{where}: document 0 of split {split!r} ({source}): a template fails: "
                            f"{_first_line(err)}") from None
        except Exception as err:  # datasets or the task's own functions on its data
            raise SpecError(f"{where} cannot be loaded (its data: {every}): {_first_line(err)}") from None
        for i, doc in enumerate(built.test_docs()):
            problem = _document_problem(built, doc, templates, fields)
            if problem is not None:
                raise SpecError(f"{where}: document {i} of split {split!r} ({source}): {problem}")


def _document_problem(built, doc: dict, templates: dict, fields: dict[str, set[str]]) -> str | None:
    """What goes wrong when the task ``built`` renders one document (None: nothing): a template that fails or gives
    nothing, or one that prints a field the document holds no value for (``datasets`` fills a field a JSON line
    lacks with null, which Jinja would print as "None"; a template that tests or defaults the field is fine)."""
    for name, template in templates.items():
        try:
            value = getattr(built, name)(doc)
        except Exception as err:  # the task's own template or function
            return f"{name} fails: {_first_line(err)}"
        if value is None:
            return f"{name} gives nothing (does the document lack a field?)"
        empty = [f for f in fields.get(name, ()) if doc.get(f) is None]
        if not empty or template in built.features:  # a column's value as it is, not a template
            continue
        try:
            _without_values().from_string(template).render(**{k: v for k, v in doc.items() if k not in empty})
        except Exception:  # printed, filtered or compared: the template uses the value it lacks
            return f"{name} uses field {', '.join(map(repr, empty))}, which the document lacks (null or missing)"
    return None


@functools.cache
def _without_values():
    """lm-eval's Jinja environment where a field left out of a document is undefined as Jinja's default makes it
    (false in a test, replaced by ``default``) but cannot be printed."""
    from jinja2 import Undefined
    from lm_eval.utils import env

    class Unprintable(Undefined):
        __str__ = Undefined._fail_with_undefined_error

    return env.overlay(undefined=Unprintable)


def _first_line(err: BaseException) -> str:
    """What went wrong, in one line: the first line of the error that caused ``err`` (``datasets`` wraps its
    reader's error in a generic one), else of ``err``; its type where it says nothing."""
    cause = err.__cause__ or err
    text = str(cause).strip().splitlines()
    return text[0] if text else type(cause).__name__


def _load_tasks(manager, configs: list[dict], tasks: Sequence[TaskSpec], role: str) -> dict:
    """``TaskManager.load`` of one role's task configs; a split missing from a downloaded dataset (lm-eval
    raises a bare KeyError) is named as a SpecError."""
    try:
        return manager.load(configs)
    except KeyError as error:
        missing = [t for t in tasks if (parse_split(_split_of(t, role))[0],) == error.args]
        if not missing:
            raise
        raise SpecError(f"task {missing[0].name} has no split {error.args[0]!r} (splits.{role})") from error


def _config_metrics(config: dict) -> list[str]:
    """The metric names of a task's YAML: its ``metric_list``, else lm-eval's defaults for its output type."""
    from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY

    if config.get("metric_list") is None:
        return list(DEFAULT_METRIC_REGISTRY[config.get("output_type", "generate_until")])
    return [getattr(m["metric"], "__name__", m["metric"]) for m in config["metric_list"]]


class DocIds(list):
    """Sorted doc ids with O(1) membership: lm-eval tests ``i in samples`` for every document of the split
    and maps results back by position, which is only right for ascending ids."""

    def __init__(self, ids: Sequence[int]) -> None:
        super().__init__(sorted(set(ids)))
        self._members = frozenset(self)

    def __contains__(self, item: object) -> bool:
        return item in self._members


def _materialize_docs(task) -> None:
    """Hold the evaluated split as a list of dicts (processed once): iterating an Arrow dataset row by row
    on every call costs more than the tiny models' forward passes."""
    split = task.config.test_split
    docs = task.test_docs()
    task.dataset = {**task.dataset, split: list(docs)}
    task.config.process_docs = None


def _set_options(task, spec: TaskSpec, config: dict) -> None:
    """The spec's task options on a loaded task, as ``simple_evaluate`` sets them: ``gen_kwargs`` merged into
    a generate_until task's generation_kwargs, ``num_fewshot`` set (a YAML's 0 kept; none at all is 0), and
    the few-shot sampler seeded with lm-eval's default seed (so every worker draws the same examples)."""
    if spec.gen_kwargs is not None and task.get_config("output_type") == "generate_until":
        task.set_config(key="generation_kwargs", value=dict(spec.gen_kwargs), update=True)
    task.set_config(key="num_fewshot", value=_num_fewshot(spec, config))
    task.set_fewshot_seed(seed=FEWSHOT_SEED)


def _cache_requests(task, **options) -> None:
    """Build the task's lm-eval requests now, once for every document of its split, and from then on hand
    out the chosen documents' requests (emptied of the last candidate's answers) on each call. A prompt
    depends on its document only, so rebuilding it per candidate is wasted work; and a few-shot prompt is
    drawn once per document, so every candidate is scored on the same prompts instead of fresh draws.
    ``options`` are ``build_all_requests``'s prompt options (system_instruction, apply_chat_template,
    fewshot_as_multiturn, chat_template), passed as ``lm_eval.evaluator.evaluate`` passes them; the per-call
    ``evaluate`` passes none, which the cached requests ignore."""
    task.build_all_requests(**options)
    by_doc: dict[int, list] = {}
    for instance in task.instances:
        by_doc.setdefault(instance.doc_id, []).append(instance)

    def build_chosen(*, samples: Sequence[int] | None = None, limit: int | None = None, **_defaults) -> None:
        chosen = samples if samples is not None else range(len(by_doc))[:limit]
        instances = []
        for position, doc_id in enumerate(chosen):  # lm-eval numbers the chosen documents by position
            for instance in by_doc[doc_id]:
                instance.doc_id, instance.resps, instance.filtered_resps = position, [], {}
                instances.append(instance)
        task._instances = instances

    task.build_all_requests = build_chosen


def _fast_hflm():
    """lm-eval's HFLM made cheap per call: no progress bars, tokenization cached (prompts and answers are the
    same text every candidate; weights change, strings do not) and causal scoring vectorized per batch."""
    from lm_eval.models.huggingface import HFLM

    class FastHFLM(HFLM):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._token_cache: dict[tuple, tuple[int, ...]] = {}
            self._probed: tuple[int, int] | None = None  # (longest request probed, batch size found)

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            key = (string, add_special_tokens, tuple(sorted(kwargs.items())))
            cached = self._token_cache.get(key)
            if cached is None:
                cached = self._token_cache[key] = tuple(super().tok_encode(string, add_special_tokens, **kwargs))
            return list(cached)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
            if self.backend != "causal":
                return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)
            size = override_bs or self.batch_size
            if size == "auto":
                size = self._auto_batch_size(requests)
            return score_continuations(self.model, [(ctx, cont) for _, ctx, cont in requests], self.max_length,
                                       size, self.tokenizer.pad_token_id or 0)

        def _auto_batch_size(self, requests) -> int:
            """lm-eval's out-of-memory probe (halving from ``max_batch_size``) on the longest request, run
            again only when a longer request than any probed before comes, not on every candidate."""
            lengths = [len(context) + len(continuation) for _, context, continuation in requests]
            longest = max(range(len(lengths)), key=lengths.__getitem__)
            if self._probed is None or lengths[longest] > self._probed[0]:
                self._probed = (lengths[longest], self._detect_batch_size(requests, longest))
            return self._probed[1]

        def loglikelihood(self, requests, disable_tqdm: bool = True):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = True):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = True):
            return super().generate_until(requests, disable_tqdm=True)

    return FastHFLM

