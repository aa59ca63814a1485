"""Every merge method on small tensors, against values computed by hand."""

import math

import pytest
import torch

from evomerge.errors import SpecError
from evomerge.kernels import magnitude_mask, outlier_mask, top_k_mask
from evomerge.merge import merge_tensor
from evomerge.params import TensorParams
from evomerge.registry import METHODS, get_method


def run(method: str, base, inputs, shared=None, per_model=None, seed=0):
    m = get_method(method)
    shared = {**{k: p.default for k, p in m.shared.items()}, **(shared or {})}
    per_model = {**{k: [p.default] * len(inputs) for k, p in m.per_model.items()}, **(per_model or {})}
    gen = torch.Generator().manual_seed(seed) if m.seeded else None
    base_t = None if base is None else torch.tensor(base, dtype=torch.float32)
    inputs_t = [torch.tensor(x, dtype=torch.float32) for x in inputs]
    return merge_tensor(m, TensorParams(shared, per_model), base_t, inputs_t, generator=gen)


def test_linear_weighted_average():
    out = run("linear", None, [[1.0, 2.0], [3.0, 4.0]], per_model={"weight": [1.0, 3.0]})
    assert out.tolist() == pytest.approx([2.5, 3.5])
    out = run("linear", None, [[1.0, 2.0], [3.0, 4.0]], {"normalize": False}, {"weight": [1.0, 3.0]})
    assert out.tolist() == pytest.approx([10.0, 14.0])


def test_task_arithmetic_scales_sum_of_deltas():
    out = run("task_arithmetic", [1.0, 1.0], [[2.0, 0.0], [3.0, 3.0]], {"lambda": 0.5}, {"weight": [1.0, 1.0]})
    # deltas (1,-1) and (2,2): 1 + 0.5 * (3, 1)
    assert out.tolist() == pytest.approx([2.5, 1.5])


def test_ties_trim_elect_and_disjoint_mean():
    base = [0.0, 0.0, 0.0, 0.0]
    a = [3.0, -1.0, 0.5, -2.0]   # density 0.5 keeps 3 and -2
    b = [-1.0, 2.0, 0.25, -4.0]  # density 0.5 keeps 2 and -4
    out = run("ties", base, [a, b], per_model={"weight": [1.0, 2.0], "density": [0.5, 0.5]})
    # weighted kept: a -> (3, 0, 0, -2); b -> (0, 4, 0, -8). signs: + + (0 -> +) -
    # entry 0: only a (w 1) -> 3/1; entry 1: only b -> 4/2; entry 2: nothing kept -> 0; entry 3: (-2-8)/3
    assert out.tolist() == pytest.approx([3.0, 2.0, 0.0, -10.0 / 3.0])


def test_ties_sign_election_drops_minority():
    out = run("ties", [0.0], [[1.0], [-3.0]], per_model={"weight": [1.0, 1.0], "density": [1.0, 1.0]})
    assert out.tolist() == pytest.approx([-3.0])  # sum -2 elects minus; only b kept, divided by its weight


def test_breadcrumbs_drops_top_and_bottom():
    delta = [float(i) for i in range(1, 11)]  # magnitudes 1..10
    out = run("breadcrumbs", [0.0] * 10, [delta], per_model={"weight": [1.0], "density": [0.5], "gamma": [0.2]})
    # keep 5, drop the 2 largest (9, 10) and the 3 smallest -> 4..8 survive
    assert out.tolist() == pytest.approx([0, 0, 0, 4, 5, 6, 7, 8, 0, 0])


def test_dare_keeps_fraction_and_l1_norm():
    torch.manual_seed(0)
    delta = torch.randn(200_000)
    out = run("dare_linear", [0.0] * delta.numel(), [delta.tolist()], per_model={"weight": [1.0], "density": [0.3]})
    kept = (out != 0).float().mean().item()
    assert kept == pytest.approx(0.3, abs=0.005)
    assert out.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-4)
    again = run("dare_linear", [0.0] * delta.numel(), [delta.tolist()], per_model={"weight": [1.0], "density": [0.3]})
    assert torch.equal(out, again)  # seeded


def test_della_keep_probability_rises_with_rank():
    torch.manual_seed(0)
    rows = torch.randn(400, 1000)
    m = get_method("della_linear")
    params = TensorParams({"lambda": 1.0, "normalize": False, "rescale": False},
                          {"weight": [1.0], "density": [0.5], "epsilon": [0.3]})
    out = merge_tensor(m, params, torch.zeros_like(rows), [rows], generator=torch.Generator().manual_seed(1))
    order = rows.abs().argsort(dim=1)
    kept_by_rank = (torch.gather(out, 1, order) != 0).float().mean(dim=0)
    assert kept_by_rank[:100].mean().item() == pytest.approx(0.2 + 0.6 * 0.05, abs=0.03)  # ~p - eps at the bottom
    assert kept_by_rank[-100:].mean().item() == pytest.approx(0.8 - 0.6 * 0.05, abs=0.03)  # ~p + eps at the top
    assert (out != 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_slerp_orthogonal_and_parallel():
    out = run("slerp", [1.0, 0.0], [[0.0, 1.0]], {"t": 0.5})
    assert out.tolist() == pytest.approx([math.sqrt(0.5), math.sqrt(0.5)])
    out = run("slerp", [1.0, 0.0], [[0.0, 1.0]], {"t": 1 / 3})
    assert out.tolist() == pytest.approx([math.cos(math.pi / 6), math.sin(math.pi / 6)])
    out = run("slerp", [1.0, 2.0], [[2.0, 4.0]], {"t": 0.25})  # parallel -> lerp
    assert out.tolist() == pytest.approx([1.25, 2.5])


def test_nuslerp_on_task_vectors():
    out = run("nuslerp", [1.0, 1.0], [[2.0, 1.0], [1.0, 2.0]], per_model={"weight": [1.0, 1.0]})
    # deltas (1,0) and (0,1) at t=0.5 -> base + (sqrt(.5), sqrt(.5))
    assert out.tolist() == pytest.approx([1 + math.sqrt(0.5), 1 + math.sqrt(0.5)])
    out = run("nuslerp", None, [[1.0, 0.0], [0.0, 1.0]], per_model={"weight": [2.0, 1.0]})
    assert out.tolist() == pytest.approx([math.cos(math.pi / 6), math.sin(math.pi / 6)])


def test_model_stock_interpolation_ratio():
    # deltas (1,0) and (0.6,0.8): cos = 0.6; t = 2*0.6 / (1 + 0.6) = 0.75; mean delta (0.8, 0.4)
    out = run("model_stock", [0.0, 0.0], [[1.0, 0.0], [0.6, 0.8]])
    assert out.tolist() == pytest.approx([0.6, 0.3])


def test_top_k_mask_handles_ties_exactly():
    mags = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5])
    assert int(top_k_mask(mags, 2).sum()) == 2
    assert magnitude_mask(torch.tensor([0.1, -5.0, 3.0]), 0.34).tolist() == [False, True, False]


def test_registry_lists_every_required_method():
    required = {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
                "della", "della_linear", "slerp", "nuslerp", "model_stock"}
    assert required <= set(METHODS)
    with pytest.raises(SpecError, match="unknown merge method 'tiez'"):
        get_method("tiez")


def test_top_k_mask_exact_count_with_many_ties():
    mags = torch.tensor([0.5, 1.0, 1.0, 1.0, 1.0, 2.0, 0.25]).repeat(1000)
    for k in (1, 1000, 2500, 5999, 6000, 6500):
        mask = top_k_mask(mags, k)
        assert int(mask.sum()) == k
        assert mags[mask].min() >= mags[~mask].max()  # nothing dropped is larger than what is kept


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_trims_keep_mergekits_entries_among_ties(dtype):
    """Task vectors of fp16/bf16 models repeat magnitudes; the entries kept at a cut through equal
    magnitudes must be the ones mergekit's sparsifiers keep (their sort order, not index order)."""
    sparsify = pytest.importorskip("mergekit.sparsify")
    gen = torch.Generator().manual_seed(0)
    for shape in [(64,), (96, 80), (300, 257), (1024, 700)]:
        base = (torch.randint(-32, 33, shape, generator=gen) / 256).to(dtype).float()
        delta = (base + torch.randint(-3, 4, shape, generator=gen) / 512).to(dtype).float() - base
        for density in (0.05, 0.3, 0.5, 0.77):
            ours = delta * magnitude_mask(delta, density)
            assert torch.equal(ours, sparsify.magnitude(delta, density)), (shape, density)
            ours = delta * outlier_mask(delta, density, 0.05)
            assert torch.equal(ours, sparsify.magnitude_outliers(delta, density, gamma=0.05)), (shape, density)


def test_descending_order_is_torchs_argsort_among_ties():
    """The faster sort behind the TIES trim (int32 bits of non-negative floats, sorted in place) gives the
    very permutation ``torch.argsort(w.float(), descending=True)`` gives, ties included, at sizes on both
    sides of the sort's strategy changes; NaN and negative inputs take the plain float sort."""
    from evomerge.kernels import _descending_order

    gen = torch.Generator().manual_seed(3)
    for n in (1, 7, 16, 255, 257, 1025, 65_537, 400_000):
        base = torch.randn(n, generator=gen).to(torch.bfloat16).float()
        w = ((base + 0.01 * torch.randn(n, generator=gen)).to(torch.bfloat16).float() - base).abs()
        assert torch.equal(_descending_order(w.clone()), torch.argsort(w, descending=True)), n
    odd = torch.tensor([1.0, float("nan"), -2.0, 1.0, 0.0, -0.0, float("inf")]).repeat(50)
    assert torch.equal(_descending_order(odd.clone()), torch.argsort(odd, descending=True))


def _argsort_top_k(w: torch.Tensor, k: int) -> torch.Tensor:
    """mergekit's kept set: the first k of argsort(|w|.float(), descending=True)."""
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    mask[torch.argsort(w.abs().float(), descending=True)[:k]] = True
    return mask


def test_compiled_top_k_is_built_where_a_compiler_is():
    """pip install builds evomerge/_topk.c (optional, so an install without a compiler still works): where
    a C compiler is, the extension must be there and agree with this build's argsort."""
    import shutil
    import sysconfig
    from pathlib import Path

    import evomerge.kernels as kernels

    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler: the trim sorts instead")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        pytest.skip("no Python headers: the trim sorts instead")
    assert kernels._topk is not None, "evomerge/_topk.c was not built: pip install -e . (a C compiler is here)"
    assert kernels._compiled_top_k_ok()


@pytest.mark.parametrize("compiled", [True, False])
def test_top_k_mask_keeps_argsorts_entries(compiled, monkeypatch):
    """Both ways to the top-k (the compiled partition-follower and the torch sort) keep exactly the first k
    of ``argsort`` on every tie pattern: none, bf16 and fp16 task vectors, a few distinct values, all equal,
    at sizes around the sort's small-range threshold (16) and large, k from 1 to n-1; fp16, fp64 and strided
    inputs, -0.0 and inf; a NaN makes the compiled path give way to the sort."""
    import evomerge.kernels as kernels

    if compiled and not kernels._compiled_top_k_ok():
        pytest.skip("the compiled top-k is not built here")
    monkeypatch.setattr(kernels, "_COMPILED_OK", compiled)
    gen = torch.Generator().manual_seed(7)
    for n in (2, 3, 16, 17, 18, 33, 100, 4097, 65_537, 300_001):
        base = torch.randn(n, generator=gen)
        patterns = [torch.randn(n, generator=gen),
                    (base.bfloat16().float() + 0.01 * torch.randn(n, generator=gen)).bfloat16().float()
                    - base.bfloat16().float(),
                    (0.01 * torch.randn(n, generator=gen)).half().float(),
                    torch.randint(-3, 4, (n,), generator=gen).float(),
                    torch.ones(n)]
        for w in patterns:
            for k in sorted({1, n // 3, n // 2, n - 1} - {0}):
                assert torch.equal(top_k_mask(w, k), _argsort_top_k(w, k)), (n, k)
    w = (0.01 * torch.randn(5000, generator=gen)).half()
    assert torch.equal(top_k_mask(w, 1234), _argsort_top_k(w, 1234))  # fp16 in
    w = torch.randn(2, 5000, generator=gen, dtype=torch.float64).bfloat16().double()
    assert torch.equal(top_k_mask(w[0], 2500), _argsort_top_k(w[0], 2500))  # fp64 in
    assert torch.equal(top_k_mask(w.t()[:, 1], 2500), _argsort_top_k(w.t()[:, 1], 2500))  # strided
    odd = torch.tensor([1.0, -2.0, 1.0, 0.0, -0.0, float("inf"), -1.0]).repeat(50)
    for k in (1, 100, 200, 349):
        assert torch.equal(top_k_mask(odd, k), _argsort_top_k(odd, k)), k
    odd[17] = float("nan")  # argsort puts NaN first
    assert torch.equal(top_k_mask(odd, 100), _argsort_top_k(odd, 100))


def test_parallel_trims_equal_sequential_ones():
    """TIES on a tensor large enough for the trims to run two at a time gives the sequential result."""
    import evomerge.kernels as kernels

    gen = torch.Generator().manual_seed(4)
    base = torch.randn(300, 400, generator=gen).to(torch.bfloat16).float()
    deltas = [(base + 0.01 * torch.randn(300, 400, generator=gen)).to(torch.bfloat16).float() - base
              for _ in range(3)]
    kwargs = dict(weight=[1.0, 0.5, 0.7], density=[0.3, 0.5, 0.9], normalize=True, rescale=False, lambda_=1.0)
    fn = get_method("ties").fn
    parallel = fn(base, [d.clone() for d in deltas], **kwargs)
    limit, kernels._PARALLEL_MIN_NUMEL = kernels._PARALLEL_MIN_NUMEL, 10**12
    try:
        sequential = fn(base, [d.clone() for d in deltas], **kwargs)
    finally:
        kernels._PARALLEL_MIN_NUMEL = limit
    assert torch.equal(parallel, sequential)
    mergekit = pytest.importorskip("mergekit.sparsify")
    for d, density in zip(deltas, kwargs["density"], strict=True):
        assert torch.equal(d * magnitude_mask(d, density), mergekit.magnitude(d, density))
