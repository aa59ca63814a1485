"""Which search documents every candidate is scored on, and what each one counts for.

A search scores all candidates on the same ordered documents per task; each rung of a race is a prefix of
them. ``SearchSubset`` is the contract: ``doc_ids`` (per task, in order) and ``shares`` (each document's
part of a task's score over any prefix of them, summing to 1), with ``weigh`` giving a result those scores.

- ``FirstDocuments`` (``subset: first``): the first ``search_examples`` documents of the search split
  (stratified by member task for a group), equal shares: lm-eval's own score.
- ``AnswerStrata`` (``subset: answers``), an informative subset: before the search the reference models
  (each parent alone, their uniform average) answer a pool of search documents; the documents they answer
  alike (the same models right) form a stratum, and the subset draws from every stratum in proportion to its
  part of the pool, each document weighted by its stratum's part over the documents drawn from it
  (stratified sampling). Within a stratum the documents are drawn spread over how surely the references
  answered them (their log-probability of the answer, where the task shows it), so a prefix spans easy to
  hard. Candidates are merges of those models, so their answers follow the strata and the surety, and the
  weighted score estimates the whole pool's score with less variance than the plain mean of as many
  documents (anchor-point methods cluster such answer profiles for the same end).
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from evomerge.evaluate import EvalResult

RIGHT = 0.5  # an answer whose score is at least this counts as right when forming strata


def _mean_evidence(task: str, ids: Sequence[int], answers: Sequence[EvalResult]) -> dict[int, float] | None:
    """Each document's evidence averaged over the reference models (None where some model's responses lack it)."""
    if not all(task in r.evidence for r in answers):
        return None
    return {d: sum(r.evidence[task][d] for r in answers) / len(answers) for d in ids}


def _spread(m: int, phase: float) -> list[int]:
    """Positions 0 .. m-1 in an order whose every prefix lies evenly over the range (a van der Corput sequence
    shifted by ``phase`` in [0, 1)), so the first k documents of a stratum sorted by surety span it from low to
    high. Each stratum gets its own phase, so that their rounding errors do not all lean the same way."""
    order: list[int] = []
    seen: set[int] = set()
    j = 0
    while len(order) < m:
        v, f, x = 0.0, 0.5, j
        while x:
            v, f, x = v + f * (x & 1), f / 2, x >> 1
        p = int(((v + phase) % 1.0) * m)
        if p not in seen:
            seen.add(p)
            order.append(p)
        j += 1
    return order


class SearchSubset(ABC):
    """The search documents per task (``doc_ids``, in the order a race takes them) and their shares."""

    doc_ids: dict[str, list[int]]

    @abstractmethod
    def shares(self, result: EvalResult, task: str, ids: Sequence[int]) -> dict[int, float]:
        """Each of ``ids`` (a prefix of ``doc_ids[task]``) as its part of ``task``'s score; they sum to 1."""

    @abstractmethod
    def weigh(self, result: EvalResult) -> EvalResult:
        """``result`` (scored on a prefix of ``doc_ids``) with each task's score the share-weighted mean."""


class FirstDocuments(SearchSubset):
    """The first documents of the search split, each counting equally (within its member task, in a group
    that weighs its tasks equally): the score lm-eval computes."""

    def __init__(self, doc_ids: dict[str, list[int]]) -> None:
        self.doc_ids = doc_ids

    def shares(self, result: EvalResult, task: str, ids: Sequence[int]) -> dict[int, float]:
        return result.example_weights(task, ids)

    def weigh(self, result: EvalResult) -> EvalResult:
        return result


class AnswerStrata(SearchSubset):
    """Documents drawn from strata of the reference models' answers, weighted by their stratum's part of the
    pool. ``strata`` maps each chosen document to its stratum; ``mass`` is each stratum's part of the pool's
    score (per task, summing to 1). ``to_json``/``from_json`` keep it exact across a resumed search."""

    def __init__(self, doc_ids: dict[str, list[int]], strata: dict[str, dict[int, str]],
                 mass: dict[str, dict[str, float]]) -> None:
        self.doc_ids, self.strata, self.mass = doc_ids, strata, mass

    @classmethod
    def from_answers(cls, pool: dict[str, list[int]], answers: Sequence[EvalResult], size: int) -> AnswerStrata:
        """Order each task's ``pool`` documents so that every prefix draws from the strata in proportion to their
        mass, and keep the first ``size``. Within a stratum the documents go spread over the references' mean
        evidence (how surely they answered), where the task's responses show it; else in pool order."""
        doc_ids, strata, mass = {}, {}, {}
        for task, ids in pool.items():
            pool_share = answers[0].example_weights(task, ids)
            members = answers[0].strata.get(task, {})
            key = {d: members.get(d, "") + ":" + "".join("1" if r.examples[task][d] >= RIGHT else "0"
                                                          for r in answers) for d in ids}
            task_mass: dict[str, float] = {}
            members_of: dict[str, list[int]] = {}
            for d in ids:
                members_of.setdefault(key[d], []).append(d)
                task_mass[key[d]] = task_mass.get(key[d], 0.0) + pool_share[d]
            rank = {}  # a document's place in its stratum's order
            surety = _mean_evidence(task, ids, answers)
            for stratum, docs in members_of.items():
                if surety is not None:  # every prefix spread over the references' surety, lowest to highest
                    docs = sorted(docs, key=surety.__getitem__)
                    docs = [docs[p] for p in _spread(len(docs), random.Random(f"{task}/{stratum}").random())]
                rank.update({d: j for j, d in enumerate(docs)})
            first = {k: i for i, k in enumerate(members_of)}  # strata in the order the pool first shows them
            order = sorted(ids, key=lambda d: ((rank[d] + 0.5) / task_mass[key[d]], first[key[d]]))
            doc_ids[task] = order[:size]
            strata[task] = {d: key[d] for d in doc_ids[task]}
            mass[task] = task_mass
        return cls(doc_ids, strata, mass)

    def shares(self, result: EvalResult, task: str, ids: Sequence[int]) -> dict[int, float]:
        counts = Counter(self.strata[task][d] for d in ids)
        total = sum(self.mass[task][k] for k in counts)  # strata not drawn yet leave their mass out
        return {d: self.mass[task][self.strata[task][d]] / (counts[self.strata[task][d]] * total) for d in ids}

    def weigh(self, result: EvalResult) -> EvalResult:
        scores = {}
        for task, per_doc in result.examples.items():
            shares = self.shares(result, task, list(per_doc))
            scores[task] = sum(shares[d] * value for d, value in per_doc.items())
        return replace(result, scores=scores)

    def to_json(self) -> dict[str, Any]:
        return {"doc_ids": self.doc_ids, "strata": {t: [[d, k] for d, k in s.items()] for t, s in self.strata.items()},
                "mass": self.mass}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> AnswerStrata:
        return cls({t: list(ids) for t, ids in doc["doc_ids"].items()},
                   {t: {int(d): k for d, k in pairs} for t, pairs in doc["strata"].items()},
                   {t: dict(m) for t, m in doc["mass"].items()})
