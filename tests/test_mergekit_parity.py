"""Our `evomerge merge` against `mergekit-yaml` on the mergekit YAML we write for the same recipe."""

import shutil

import pytest
import torch
from helpers import build_tied_zoo, weights

from evomerge.merge import merge_to_folder
from evomerge.recipes import Recipe

pytestmark = pytest.mark.skipif(shutil.which("mergekit-yaml") is None, reason="mergekit is not installed")

GRADIENT = [0.2, 0.9, 0.5]
ATTN_FILTER = [{"filter": "self_attn", "value": 0.8}, {"value": [0.1, 0.6]}]


def per_model(names, **params):
    return [{"model": n, "parameters": params} for n in names]


def cases(zoo):
    base, a, b, c = (str(zoo[k]) for k in ("base", "a", "b", "c"))
    return {
        "linear": dict(models=per_model([a, b, c], weight=GRADIENT)),
        "task_arithmetic": dict(base_model=base, models=per_model([a, b], weight=ATTN_FILTER),
                                parameters={"lambda": 0.8}),
        "ties": dict(base_model=base, models=per_model([a, b, c], weight=GRADIENT, density=ATTN_FILTER)),
        "breadcrumbs": dict(base_model=base, models=per_model([a, b], weight=1.0, density=0.6, gamma=0.05)),
        "breadcrumbs_ties": dict(base_model=base, models=per_model([a, b, c], weight=0.5, density=[0.3, 0.9])),
        "slerp": dict(base_model=base, models=[{"model": base}, {"model": a}],
                      parameters={"t": [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.35}]}),
        "nuslerp": dict(base_model=base, models=per_model([a, b], weight=[1.0, 0.3])),
        "model_stock": dict(base_model=base, models=[{"model": m} for m in (a, b, c)]),
    }


def run_both(recipe: Recipe, tmp_path, mergekit):
    """Our merge, and mergekit-yaml's on the mergekit_config.yml our merge wrote."""
    ours = merge_to_folder(recipe, tmp_path / "ours")
    done = mergekit.run("mergekit-yaml", ours / "mergekit_config.yml", tmp_path / "theirs")
    assert done.returncode == 0, done.stderr[-2000:]
    return weights(ours), weights(tmp_path / "theirs")


@pytest.mark.parametrize("method", list(cases({k: k for k in ("base", "a", "b", "c")})))
def test_deterministic_methods_match_mergekit(method, llama_zoo, tmp_path, mergekit):
    recipe = Recipe(merge_method=method, **cases(llama_zoo)[method])
    ours, theirs = run_both(recipe, tmp_path, mergekit)
    assert set(ours) == set(theirs)
    worst = max((ours[n] - theirs[n]).abs().max().item() for n in ours)
    assert worst <= 1e-5, f"{method}: max abs difference {worst}"


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_elementwise_merges_in_slices_are_whole_tensor_merges(method, llama_zoo, tmp_path, monkeypatch, mergekit):
    """Slice by slice (97 entries here, see conftest: uneven slices, every tensor past 97 entries in several)
    the output is bit for bit the one-piece merge's, and mergekit's within 1e-5."""
    import evomerge.checkpoint
    import evomerge.merge

    recipe = Recipe(merge_method=method, dtype="bfloat16", **cases(llama_zoo)[method])
    slices = []
    read_slices = evomerge.checkpoint.Checkpoint.read_slices
    monkeypatch.setattr(evomerge.checkpoint.Checkpoint, "read_slices",
                        lambda self, name, size: (slices.append(x.numel()) or x for x in read_slices(self, name, size)))
    ours, theirs = run_both(recipe, tmp_path, mergekit)
    assert len(slices) > 10 * len(ours) and max(slices) == 97  # large tensors were read in slices
    monkeypatch.setattr(evomerge.merge, "SLICE", 1 << 30)
    whole = weights(merge_to_folder(recipe, tmp_path / "whole"))
    for name, tensor in ours.items():
        assert torch.equal(tensor, whole[name]), name
        assert (tensor.float() - theirs[name].float()).abs().max() <= 1e-5, name


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_random_methods_agree_statistically(method, llama_zoo, tmp_path, mergekit):
    base, a = str(llama_zoo["base"]), str(llama_zoo["a"])
    params = {"weight": 1.0, "density": 0.4, **({"epsilon": 0.2} if method.startswith("della") else {})}
    recipe = Recipe(merge_method=method, base_model=base, models=per_model([a], **params))
    ours, theirs = run_both(recipe, tmp_path, mergekit)
    b, x = weights(llama_zoo["base"]), weights(llama_zoo["a"])
    for name in ("model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight"):
        delta = x[name] - b[name]
        for merged in (ours[name], theirs[name]):
            kept = merged - b[name]
            # mergekit draws its masks from the unseeded global RNG: bounds are ~4.5 standard deviations
            assert (kept != 0).float().mean().item() == pytest.approx(0.4, abs=0.06)
            assert kept.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-3)
            # a kept entry is the original entry times one common L1 rescale factor
            sure = (kept != 0) & (delta.abs() > 1e-3)  # tiny deltas lose digits in (base + d) - base
            ratio = kept[sure] / delta[sure]
            torch.testing.assert_close(ratio, torch.full_like(ratio, ratio.median().item()), rtol=1e-3, atol=0)


TIED_CASES = {
    "ties": dict(weight=1.0, density=[0.15, 0.5, 0.85]),
    "ties filtered": dict(weight=[0.5, 1.0], density=[{"filter": "mlp", "value": 0.4}, {"value": [0.3, 0.7]}]),
    "breadcrumbs_ties": dict(weight=1.0, density=[0.3, 0.8], gamma=0.05),
    "ties in the input dtype": dict(weight=1.0, density=[0.15, 0.5, 0.85]),  # no recipe dtype: fp16/bf16 out
}


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def tied_zoo(request, tmp_path_factory):
    return build_tied_zoo(tmp_path_factory.mktemp(f"tied-{request.param}"), request.param)


@pytest.mark.parametrize("case", list(TIED_CASES))
def test_ties_among_equal_magnitudes_match_mergekit(case, tied_zoo, tmp_path, mergekit):
    """fp16/bf16 task vectors with few distinct magnitudes: the entries kept at the top-k cut are mergekit's."""
    method = case.split()[0]
    base, *models = (str(tied_zoo[k]) for k in ("base", "a", "b", "c"))
    recipe = Recipe(merge_method=method, base_model=base, dtype=None if "input dtype" in case else "float32",
                    models=per_model(models, **TIED_CASES[case]))
    ours, theirs = run_both(recipe, tmp_path, mergekit)
    assert {n: t.dtype for n, t in ours.items()} == {n: t.dtype for n, t in theirs.items()}
    worst = max((ours[n] - theirs[n]).abs().max().item() for n in ours)
    assert worst <= 1e-5, f"{case}: max abs difference {worst}"
