"""The GPU path: a worker whose model and inputs live on the device (merge math there), or whose inputs are
memory-mapped in host memory and staged through pinned buffers (the same bits), its
merge (single-method and layer-wise) equal to the streamed CPU merge, a real device out-of-memory error
returned as a failed candidate with the memory given back, and a Ray actor placed on a GPU. Skipped without
CUDA (CI has none); run them wherever a GPU is present."""

import pytest
import torch
from helpers import SPEC

from evomerge.executors import Job
from evomerge.merge import merge_to_folder
from evomerge.ray_executor import plan_workers
from evomerge.recipes import LayerwiseRecipe, Recipe
from evomerge.spec import SearchSpec
from evomerge.worker import Worker

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
IDS = {"demo_add": list(range(20)), "demo_reverse": list(range(20))}


def test_worker_plan_follows_the_gpus():
    spec = SearchSpec.model_validate(SPEC)  # device: auto
    assert plan_workers(spec, {"CPU": 16, "GPU": 8}, None, 1).workers == 8
    two = plan_workers(spec, {"CPU": 16, "GPU": 8}, None, 2)
    assert (two.workers, two.gpus, two.device, two.threads) == (4, 2, "cuda", None)
    cpu = plan_workers(spec.model_copy(update={"device": "cpu"}), {"CPU": 16, "GPU": 8}, 4, 1)
    assert (cpu.workers, cpu.gpus, cpu.threads, cpu.device) == (4, 0, 4, "cpu")
    assert plan_workers(spec, {"CPU": 2}, 2, 1).threads == 1


def assert_live_equals_streamed(worker: Worker, recipe, tmp_path) -> None:
    """The worker scores ``recipe`` (merging it on its device); its live parameters then equal the streamed
    CPU merge to float rounding."""
    from safetensors.torch import load_file

    assert worker.run(Job(recipe, "search", IDS)).error is None
    streamed = load_file(merge_to_folder(recipe, tmp_path / "cpu") / "model.safetensors")
    live = dict(worker.model.named_parameters())
    for name, tensor in streamed.items():
        torch.testing.assert_close(live[name].detach().cpu(), tensor.to(torch.float32), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def gpu_worker():
    return Worker(SearchSpec.model_validate({**SPEC, "device": "cuda"}))


@cuda
def test_merge_runs_on_the_device_and_equals_the_streamed_merge(gpu_worker, tmp_path):
    merger = gpu_worker.merger
    recipe = Recipe(merge_method="task_arithmetic", base_model="demo:base", dtype="float32",
                    models=[{"model": "demo:add", "parameters": {"weight": [0.3, 0.9]}},
                            {"model": "demo:reverse", "parameters": {"weight": 0.6}}])
    assert gpu_worker.name.split(":")[1] == "cuda"
    assert_live_equals_streamed(gpu_worker, recipe, tmp_path)
    assert merger.inputs.placement == "device"  # auto: the tiny zoo fits on the GPU
    assert {t.device.type for t in merger.inputs._held.values()} == {"cuda"}


@cuda
def test_inputs_in_host_memory_give_the_device_placements_bits_and_hold_nothing_on_the_gpu():
    """Staged through pinned buffers, a TIES merge gives the bits of the inputs held on the device; the GPU's
    peak while merging is the live model plus one tensor's scratch and staged copies."""
    from transformers import AutoModelForCausalLM

    from evomerge.merge import LiveMerger
    from evomerge.refs import resolve_model_path

    recipe = Recipe(merge_method="ties", base_model="demo:base", dtype="float32", seed=1,
                    models=[{"model": "demo:add", "parameters": {"weight": 0.7, "density": 0.4}},
                            {"model": "demo:reverse", "parameters": {"weight": 0.5, "density": 0.6}}])
    merged = {}
    for inputs_on in ("device", "host"):
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path("demo:base")).to("cuda")
        merger = LiveMerger(model, "demo:base", ["demo:add", "demo:reverse"], inputs_on=inputs_on)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        merger.apply(recipe)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
        assert merger.inputs.placement == inputs_on
        if inputs_on == "host":
            largest = max(p.numel() for p in model.parameters()) * 4
            assert merger.inputs.resident_bytes == 0 and peak <= 12 * largest
        merged[inputs_on] = {n: p.detach().cpu() for n, p in model.named_parameters()}
    assert all(torch.equal(merged["host"][n], t) for n, t in merged["device"].items())


@cuda
def test_layerwise_merge_on_the_device_equals_the_streamed_merge(gpu_worker, tmp_path):
    """Each block by its group's method on the GPU; linear and task arithmetic have no magnitude cut, so
    the GPU and CPU merges agree to float rounding."""
    models = [{"model": "demo:add", "parameters": {"weight": 0.7}},
              {"model": "demo:reverse", "parameters": {"weight": 0.4}}]
    recipe = LayerwiseRecipe(base_model="demo:base", outer=1, dtype="float32", groups=[
        {"layers": [0, 1], "merge_method": "task_arithmetic", "models": models},
        {"layers": [1, gpu_worker.merger.num_layers], "merge_method": "linear", "models": models}])
    assert_live_equals_streamed(gpu_worker, recipe, tmp_path)


@cuda
def test_device_out_of_memory_is_a_failed_candidate(gpu_worker, monkeypatch):
    good = Recipe(merge_method="linear", models=[{"model": "demo:add"}, {"model": "demo:reverse"}])
    before = gpu_worker.run(Job(good, "search", IDS))
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    real = gpu_worker.evaluator.evaluate

    def greedy(role, doc_ids=None):
        _ = torch.empty(1 << 30, device="cuda")  # 4 GiB that the failing frame (kept by its traceback) holds
        free, _total = torch.cuda.mem_get_info()
        torch.empty(free * 2, dtype=torch.uint8, device="cuda")  # more than the card has
        return real(role, doc_ids)

    monkeypatch.setattr(gpu_worker.evaluator, "evaluate", greedy)
    failed = gpu_worker.run(Job(good, "search", IDS))
    assert failed.result is None and "OutOfMemoryError" in failed.error
    assert torch.cuda.memory_allocated() <= allocated + (1 << 20)  # the worker let the failed frame's memory go
    monkeypatch.setattr(gpu_worker.evaluator, "evaluate", real)
    again = gpu_worker.run(Job(good, "search", IDS))
    torch.cuda.synchronize()
    assert again.result.scores == before.result.scores
    assert torch.cuda.memory_allocated() <= allocated + (1 << 20)  # what the failure held is given back


@cuda
def test_ray_actor_runs_on_a_gpu():
    pytest.importorskip("ray")
    from evomerge.ray_executor import RayExecutor

    executor = RayExecutor(SearchSpec.model_validate(SPEC), workers=1)
    try:
        assert executor.plan.device == "cuda" and executor.plan.gpus == 1
        good = Recipe(merge_method="linear", models=[{"model": "demo:add"}, {"model": "demo:reverse"}])
        executor.submit(0, Job(good, "search", IDS))
        key, outcome = executor.wait_any()
        assert key == 0 and outcome.error is None and ":cuda" in outcome.worker
    finally:
        executor.close()
