"""Candidates on Ray: one long-lived actor per GPU (or per ``gpus_per_worker`` GPUs), or per CPU worker
slot, each a ``Worker`` that loads the models once and then merges in place and evaluates. Recipes go in,
per-example scores come back; no weights travel per candidate.

Without an address a private local Ray is started (bound to 127.0.0.1, no dashboard, no usage reporting)
and shut down at the end; ``address`` (``auto`` or ``HOST:PORT``) joins a running cluster, whose nodes
must have evomerge installed and see the models at the same paths.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from evomerge.errors import SearchError, SpecError
from evomerge.executors import Job, Outcome
from evomerge.spec import SearchSpec
from evomerge.worker import Worker

RAY_CONNECT_TIMEOUT_S = 10.0  # how long to wait for a cluster's address to answer before giving up
MAX_RESTARTS = 2  # a worker process that dies is restarted this often, then dropped from the pool
PIPELINE = 2  # jobs in flight per worker: one running, one queued behind it


@dataclass(frozen=True)
class WorkerPlan:
    """How many actors, and what each one asks Ray for."""

    workers: int
    cpus: float
    gpus: float
    threads: int | None  # torch threads per CPU worker (None: torch's default, for GPU workers)
    device: str  # what each worker puts its model on, as seen inside its actor


def plan_workers(spec: SearchSpec, resources: dict[str, float], workers: int | None, gpus_per_worker: int,
                 largest_node_cpus: int | None = None) -> WorkerPlan:
    """One worker per ``gpus_per_worker`` GPUs when the spec runs on GPUs and the cluster has them; else
    ``workers`` CPU workers (default 1) sharing the CPUs, each with its share of torch threads (at most one
    node's CPUs, so that every worker fits on a node)."""
    if spec.device not in ("auto", "cpu", "cuda"):
        raise SpecError(f"device {spec.device!r} with Ray workers: use auto, cpu or cuda (each worker is given "
                        "its own GPUs)")
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    wants_gpu = (spec.device == "auto" and gpus > 0) or spec.device == "cuda"
    if wants_gpu:
        if gpus < gpus_per_worker:
            raise SpecError(f"the Ray cluster has {gpus} GPU(s); gpus_per_worker is {gpus_per_worker}")
        count = workers or gpus // gpus_per_worker
        if count * gpus_per_worker > gpus:
            raise SpecError(f"{count} workers x {gpus_per_worker} GPU(s) need {count * gpus_per_worker} GPUs; "
                            f"the Ray cluster has {gpus}")
        return WorkerPlan(count, 1, gpus_per_worker, None, "cuda")
    count = workers or 1
    if count > cpus:
        raise SpecError(f"{count} CPU workers need at least {count} CPUs; the Ray cluster has {cpus}")
    threads = max(1, min(largest_node_cpus or cpus, cpus // count))
    return WorkerPlan(count, threads, 0, threads, "cpu")


@contextlib.contextmanager
def _stderr_held() -> Iterator[None]:
    """Hold back what Ray's native code writes to stderr while it starts (a warning about probing the
    network for the machine's address, on an air-gapped machine) and show it only if the start fails."""
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            os.write(2, held.read())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def check_reachable(address: str) -> None:
    """A ``HOST:PORT`` cluster address that accepts a connection within ``RAY_CONNECT_TIMEOUT_S``: Ray itself retries
    an address where nothing listens for many minutes, silently. ``auto`` (and anything that is not
    ``HOST:PORT``) is left to Ray, which finds or refuses it at once."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    timeout = RAY_CONNECT_TIMEOUT_S
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:  # refused, unreachable, unknown host, or no answer in time
        reason = "no answer" if isinstance(err, TimeoutError) else err.strerror or str(err)
        raise SpecError(f"cannot join the Ray cluster at {address}: {reason} (waited at most {timeout:g} s)") from None


def check_gpus_per_worker(plan: WorkerPlan, gpus_per_worker: int | None) -> None:
    """``--gpus-per-worker`` asks for GPU workers: refused when the workers would run on CPUs (no GPUs, or
    device cpu), where it would be ignored."""
    if gpus_per_worker is not None and not plan.gpus:
        raise SpecError(f"--gpus-per-worker {gpus_per_worker}: the workers run on CPUs here (no GPU to give them, "
                        "or device cpu); drop it")


def _has_auth_token() -> bool:
    """Whether a Ray authentication token is at hand where Ray looks for one (``ray start`` turns token
    authentication on when it finds one; a driver that joins must then send it, and sending it to a cluster
    without authentication does no harm)."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or Path(path).is_file()


def start_ray(address: str | None) -> bool:
    """Connect to ``address`` or start a private local Ray; True when this call started it. Ray reads its
    settings from the environment when it is imported, so they are set first."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")
    if address and _has_auth_token():
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # a driver joining a cluster does not switch it on itself
    import ray

    if ray.is_initialized():
        return False
    if address:
        check_reachable(address)  # before Ray's own silent retries
    common: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
    try:
        with _stderr_held():
            if address:
                ray.init(address=address, **common)
            else:
                ray.init(num_cpus=os.cpu_count(), _node_ip_address="127.0.0.1", **common)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise SpecError(f"cannot start or join {where}: {str(err).splitlines()[0][:200]}") from None
    return True


class RayExecutor:
    """Up to ``PIPELINE`` jobs in flight per actor (Ray queues the second behind the first, so a worker starts
    its next candidate without waiting for the driver to tell the last one and ask for a new one);
    ``wait_any`` returns whichever job finishes first."""

    def __init__(self, spec: SearchSpec, workers: int | None = None, address: str | None = None,
                 gpus_per_worker: int | None = None) -> None:
        self._started = start_ray(address)  # before Ray is imported here: it reads its settings then
        import ray

        try:
            node_cpus = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=None)
            self.plan = plan_workers(spec, ray.cluster_resources(), workers, gpus_per_worker or 1, node_cpus)
            check_gpus_per_worker(self.plan, gpus_per_worker)
            device_spec = spec.model_copy(update={"device": self.plan.device})
            actor = ray.remote(Worker).options(num_cpus=self.plan.cpus, num_gpus=self.plan.gpus,
                                               max_restarts=MAX_RESTARTS, max_task_retries=0)
            self._actors = [actor.remote(device_spec, self.plan.threads, f"ray{i}", self.plan.gpus > 1)
                            for i in range(self.plan.workers)]
            first = spec.evaluation.tasks[0].name
            ray.get([a.doc_ids.remote(first, "search") for a in self._actors])  # every model loaded
            placed = collections.Counter(ray.get([a.inputs.remote() for a in self._actors]))
        except ray.exceptions.RayActorError as err:
            self.close()
            raise SearchError(f"a Ray worker failed to start: {str(err).splitlines()[-1][:300]}") from None
        except BaseException:
            self.close()
            raise
        self.name = f"ray x{self.plan.workers} ({self.plan.device})"
        self.inputs = "\n".join(f"{count} worker(s): {line}" for line, count in placed.items())
        count = len(self._actors)
        self._state: list[Literal["ready", "restarting", "dead"]] = ["ready"] * count
        self._load = [0] * count  # jobs in flight per actor
        self._deaths = [0] * count
        self._life = [0] * count  # bumped at each death: a job of an earlier life failing is not a new death
        self._flight: dict[Any, tuple[int, int, int]] = {}  # object ref -> (key, actor index, actor life)
        self._probes: dict[Any, int] = {}  # readiness probe of a restarting actor -> its index

    def slots(self) -> int:
        """Job places on workers alive or coming back (a restarting one takes jobs again once it is up)."""
        return PIPELINE * sum(state != "dead" for state in self._state)

    def can_submit(self) -> bool:
        return any(s == "ready" and self._load[i] < PIPELINE for i, s in enumerate(self._state))

    def busy(self) -> int:
        return len(self._flight)

    def workers(self) -> tuple[int, int]:
        alive = [i for i, state in enumerate(self._state) if state != "dead"]
        return sum(self._load[i] > 0 for i in alive), len(alive)

    def doc_ids(self, task: str, role: str) -> list[int]:
        import ray

        return ray.get(self._actors[self._free_actor()].doc_ids.remote(task, role))

    def submit(self, key: int, candidate: Job) -> None:
        """Hand the job to the least loaded ready worker; waits for a restarting one when none has room."""
        index = self._free_actor()
        self._load[index] += 1
        self._flight[self._actors[index].run.remote(candidate)] = (key, index, self._life[index])

    def wait_any(self) -> tuple[int, Outcome]:
        import ray

        while True:
            ready, _ = ray.wait([*self._flight, *self._probes], num_returns=1)
            if ready[0] in self._probes:
                self._probed(ready[0])
                continue
            key, index, life = self._flight.pop(ready[0])
            self._load[index] -= 1
            try:
                return key, ray.get(ready[0])
            except ray.exceptions.RayActorError as err:  # the worker process died: Ray restarts it (bounded)
                if life == self._life[index]:  # the job queued behind it fails too: one death, counted once
                    self._life[index] += 1
                    self._deaths[index] += 1
                    self._state[index] = "restarting" if self._deaths[index] <= MAX_RESTARTS else "dead"
                    if self._state[index] == "restarting":
                        self._probe(index)
                return key, Outcome(None, "full", None, 0.0, 0.0, f"ray{index}", worker_lost=True,
                                    error=f"worker ray{index} died ({type(err).__name__})")

    def _free_actor(self) -> int:
        """A ready actor with room for another job (the least loaded); waits for restarting ones if needed."""
        import ray

        while True:
            free = [i for i, state in enumerate(self._state) if state == "ready" and self._load[i] < PIPELINE]
            if free:
                return min(free, key=self._load.__getitem__)
            if not self._probes:
                raise SearchError("no Ray worker left")
            ready, _ = ray.wait(list(self._probes), num_returns=1)
            self._probed(ready[0])

    def _probe(self, index: int) -> None:
        self._probes[self._actors[index].__ray_ready__.remote()] = index

    def _probed(self, ref: Any) -> None:
        """A restarting actor answered: ready again, still coming back (probe again), or dead for good."""
        import ray

        index = self._probes.pop(ref)
        try:
            ray.get(ref)
            self._state[index] = "ready"
        except ray.exceptions.ActorUnavailableError:
            self._probe(index)
        except ray.exceptions.RayActorError:
            self._state[index] = "dead"

    def close(self) -> None:
        import ray

        for actor in getattr(self, "_actors", []):
            ray.kill(actor)
        self._actors = []
        if self._started:
            ray.shutdown()
            self._started = False
