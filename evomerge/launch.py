"""Launching a search's workers: which executor a run gets and starting it. It sits above both executors, so
neither imports the other (the Ray executor builds on the in-process one's Worker and job types)."""

from __future__ import annotations

import os
from typing import Literal

import torch

from evomerge.errors import SpecError
from evomerge.executors import Executor, InProcessExecutor, Worker, check_device
from evomerge.ray_executor import RayExecutor, check_gpus_per_worker, plan_workers
from evomerge.spec import SearchSpec


def choose_executor(spec: SearchSpec, kind: Literal["auto", "local", "ray"] = "auto", workers: int | None = None,
                    address: str | None = None, gpus_per_worker: int | None = None) -> Literal["local", "ray"]:
    """``local`` (in-process) or ``ray``: Ray when asked for, when several workers, a cluster address or GPUs
    per worker (None: not given, 1) are given, or when the spec may use GPUs and several are visible. Checked
    before anything starts: the device of an in-process run, the worker plan of a local Ray (a cluster's
    resources are known only once joined)."""
    several_gpus = spec.device in ("auto", "cuda") and torch.cuda.device_count() > 1
    asked = (workers or 1) > 1 or address or gpus_per_worker is not None
    if kind == "ray" or (kind == "auto" and (asked or several_gpus)):
        if not address:
            plan = plan_workers(spec, {"CPU": os.cpu_count() or 1, "GPU": torch.cuda.device_count()}, workers,
                                gpus_per_worker or 1)
            check_gpus_per_worker(plan, gpus_per_worker)
        return "ray"
    if asked:
        raise SpecError("--workers above 1, --ray-address and --gpus-per-worker need the Ray executor "
                        "(--executor ray or auto)")
    check_device(spec.device)
    return "local"


def make_executor(spec: SearchSpec, kind: Literal["local", "ray"], workers: int | None = None,
                  address: str | None = None, gpus_per_worker: int | None = None) -> Executor:
    """The executor ``choose_executor`` picked, started (models loaded on every worker)."""
    if kind == "ray":
        return RayExecutor(spec, workers=workers, address=address, gpus_per_worker=gpus_per_worker)
    return InProcessExecutor(Worker(spec))
