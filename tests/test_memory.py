"""A live worker's memory: the live model plus one tensor's merge scratch, its inputs read as stored from where
they are placed (on the device, or memory-mapped in host memory), and the same bits either way as the streamed
merge of the recipe."""

import mmap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from evomerge import placement
from evomerge.cli import main
from evomerge.errors import SpecError
from evomerge.merge import LiveMerger, merge_to_folder
from evomerge.models import open_checkpoint
from evomerge.placement import DeviceInputs, HostInputs, Stager, place_inputs
from evomerge.recipes import LayerwiseRecipe, Recipe
from evomerge.registry import METHODS


@pytest.fixture(scope="module")
def bf16_zoo(llama_zoo, tmp_path_factory) -> dict[str, Path]:
    """The conftest Llama family stored in bfloat16: task vectors of bf16 weights have many equal magnitudes."""
    root = tmp_path_factory.mktemp("bf16zoo")
    out = {}
    for name, folder in llama_zoo.items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        model.save_pretrained(root / name)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (root / name / f).write_bytes((folder / f).read_bytes())
        out[name] = root / name
    return out


def recipe_for(method: str, zoo: dict[str, Path]) -> Recipe:
    """A recipe of ``method`` over as many of the zoo's experts as it takes, with per-model values that differ."""
    entry = METHODS[method]
    count = min(entry.max_models or 3, 3)
    models = []
    for i, name in enumerate(["a", "b", "c"][:count]):
        params = {k: v for k, v in {"weight": [0.2 + 0.3 * i, 0.9 - 0.2 * i], "density": 0.55 + 0.1 * i,
                                    "gamma": 0.05, "epsilon": 0.1}.items() if k in entry.per_model}
        models.append({"model": str(zoo[name]), "parameters": params})
    shared = {"t": [0.2, 0.7]} if method == "slerp" else {}
    return Recipe(merge_method=method, base_model=str(zoo["base"]), models=models, parameters=shared, seed=5,
                  dtype="bfloat16")


def live_merge(recipe, zoo: dict[str, Path], inputs_on: str) -> tuple[dict[str, torch.Tensor], LiveMerger]:
    model = AutoModelForCausalLM.from_pretrained(zoo["base"], dtype=torch.bfloat16)
    merger = LiveMerger(model, str(zoo["base"]), [str(zoo[n]) for n in ("a", "b", "c")], inputs_on=inputs_on)
    merger.apply(recipe)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, merger


def assert_same_bits(live: dict[str, torch.Tensor], streamed: dict[str, torch.Tensor]) -> None:
    assert set(streamed) <= set(live)
    for name, tensor in streamed.items():
        assert live[name].dtype == tensor.dtype and torch.equal(live[name], tensor), name


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_placement_gives_the_streamed_merges_bits(method, bf16_zoo, tmp_path):
    recipe = recipe_for(method, bf16_zoo)
    streamed = load_file(merge_to_folder(recipe, tmp_path / "out") / "model.safetensors")
    for inputs_on in ("host", "device"):
        live, merger = live_merge(recipe, bf16_zoo, inputs_on)
        assert merger.inputs.placement == inputs_on
        assert_same_bits(live, streamed)


def test_a_layerwise_recipe_gives_the_same_bits_in_each_placement(bf16_zoo, tmp_path):
    models = [{"model": str(bf16_zoo[n]), "parameters": {"weight": 0.4 + 0.2 * i, "density": 0.6}}
              for i, n in enumerate("abc")]
    recipe = LayerwiseRecipe(base_model=str(bf16_zoo["base"]), outer=0, dtype="bfloat16", seed=3, groups=[
        {"layers": [0, 1], "merge_method": "ties", "models": models},
        {"layers": [1, 2], "merge_method": "dare_linear", "models": models},
        {"layers": [2, 3], "merge_method": "linear", "models": [{"model": m["model"]} for m in models]}])
    streamed = load_file(merge_to_folder(recipe, tmp_path / "out") / "model.safetensors")
    for inputs_on in ("host", "device"):
        assert_same_bits(live_merge(recipe, bf16_zoo, inputs_on)[0], streamed)


def held_tensors(obj, skip: set[int], seen: set[int] | None = None) -> list[torch.Tensor]:
    """Every tensor reachable from ``obj``'s attributes, dicts, lists and tuples, less those whose storage is in
    ``skip`` (the live model's parameters)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, torch.nn.Module | str | bytes | Path | mmap.mmap):
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [] if obj.untyped_storage().data_ptr() in skip else [obj]
    children = (list(obj.values()) + list(obj.keys()) if isinstance(obj, dict) else list(obj)
                if isinstance(obj, list | tuple | set) else list(vars(obj).values()) if hasattr(obj, "__dict__")
                else [])
    return [t for child in children for t in held_tensors(child, skip, seen)]


def test_a_merger_keeps_no_float32_copy_of_its_inputs(bf16_zoo):
    """Memory-mapped, a merger keeps no tensor at all beside the live model between candidates; on the device it
    keeps each input once as stored (bf16): (models + 1) x the model's bytes, never float32 task vectors."""
    recipe = recipe_for("ties", bf16_zoo)
    model_bytes = sum(t.nbytes for t in load_file(bf16_zoo["base"] / "model.safetensors").values())
    for inputs_on in ("host", "device"):
        _, merger = live_merge(recipe, bf16_zoo, inputs_on)
        skip = {p.untyped_storage().data_ptr() for p in merger.model.parameters()}
        kept = held_tensors(merger, skip)
        assert not [t for t in kept if t.dtype == torch.float32 and t.numel() > 1]
        kept_bytes = sum(t.nbytes for t in kept if t.is_floating_point())
        assert kept_bytes == merger.inputs.resident_bytes
        assert kept_bytes == (0 if inputs_on == "host" else 4 * model_bytes)


def test_mapped_tensors_are_the_files_pages_and_never_write_them(bf16_zoo):
    ckpt = open_checkpoint(str(bf16_zoo["a"]))
    name = next(n for n, i in ckpt.tensors.items() if len(i.shape) == 2)
    first, again = ckpt.view(name), ckpt.view(name)
    assert first.data_ptr() == again.data_ptr()  # one map per file: the page cache's copy
    assert torch.equal(first, ckpt.read(name)) and first.dtype == torch.bfloat16
    before = ckpt.tensors[name].file.read_bytes()
    first.zero_()  # a private map: the write goes to a copy
    assert ckpt.tensors[name].file.read_bytes() == before


def test_the_stager_copies_through_two_reused_buffers():
    stager = Stager(64 * 4, pin=False)
    buffers = [b.data_ptr() for b in stager.buffers]
    sources = [torch.randn(n) for n in (64, 7, 1, 64, 30)] + [torch.arange(10, dtype=torch.int64)]
    out = [stager.to_device(s, torch.device("cpu")) for s in sources]
    for source, copy in zip(sources, out, strict=True):
        assert torch.equal(source, copy) and copy.data_ptr() not in buffers  # a copy of its own, not a buffer
    assert [b.data_ptr() for b in stager.buffers] == buffers


def test_auto_keeps_a_cpu_workers_inputs_in_its_maps(bf16_zoo):
    ckpts = {str(bf16_zoo[n]): open_checkpoint(str(bf16_zoo[n])) for n in ("base", "a")}
    devices = dict.fromkeys(next(iter(ckpts.values())).tensors, torch.device("cpu"))
    assert isinstance(place_inputs("auto", ckpts, devices), HostInputs)
    assert isinstance(place_inputs("device", ckpts, devices), DeviceInputs)
    with pytest.raises(SpecError, match="inputs_on must be one of"):
        place_inputs("gpu", ckpts, devices)


@pytest.mark.parametrize("inputs_on, free, says", [
    ("device", 10_000, r"inputs_on device: 2 model\(s\) need 0\.00 GB on cpu"),
    ("host", 1_000, "inputs_on host: merging the largest tensor needs"),
    ("auto", 1_000, "inputs_on host: merging the largest tensor needs"),
])
def test_a_placement_that_cannot_fit_is_refused_with_the_sizes(bf16_zoo, monkeypatch, inputs_on, free, says):
    monkeypatch.setattr(placement, "free_bytes", lambda device: free)
    model = AutoModelForCausalLM.from_pretrained(bf16_zoo["base"], dtype=torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(SpecError, match=says):
        LiveMerger(model, str(bf16_zoo["base"]), [str(bf16_zoo["a"])], inputs_on=inputs_on)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.slow
def test_search_says_where_the_inputs_are_and_refuses_what_cannot_fit(tmp_path, monkeypatch, capsys):
    import yaml

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "base_model": "demo:base", "models": ["demo:add", "demo:reverse"], "device": "cpu", "sampler": "random",
        "evaluation": {"include_paths": ["demo"], "tasks": [{"name": "demo_add"}], "search_examples": 6,
                       "screen_examples": None, "top_k": 1}}))
    assert main(["search", str(spec), "--budget", "1", "--run", str(tmp_path / "run")]) == 0
    shown = capsys.readouterr()
    assert "inputs memory-mapped in host memory: 3 model(s)" in shown.out + shown.err
    monkeypatch.setattr(placement, "free_bytes", lambda device: 1)
    run = tmp_path / "refused"
    assert main(["search", str(spec), "--budget", "1", "--run", str(run), "--inputs-on", "device"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "inputs_on device: 3 model(s) need" in err[0] and "has 0.00 GB free" in err[0]
    assert not run.exists()
