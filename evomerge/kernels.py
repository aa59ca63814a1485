"""Merge methods as pure tensor functions, one per name in :mod:`evomerge.registry` (which declares their
parameters and loads this module on first use).

Semantics follow mergekit's, so a recipe means the same in both tools. Every function works on one
tensor name at a time. A method that works on task vectors (``uses_deltas``) receives ``d_i = x_i - base``
whenever a base exists and returns a merged delta (the caller adds the base back); otherwise it receives
and returns raw weights. All arithmetic is float32 (float64 if the inputs are).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from evomerge.registry import Sparsifier

try:
    from evomerge import _topk  # evomerge/_topk.c, built at install where a C compiler is
except ImportError:
    _topk = None

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- sparsification


def rescale_l1(delta: Tensor, mask: Tensor, eps: float = 1e-7) -> Tensor:
    """Keep the masked entries and scale them so the L1 norm equals the original's."""
    kept = delta * mask
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def _tied_samples() -> list[Tensor]:
    """Magnitudes of bf16-rounded task vectors (ties everywhere) at sizes where sort strategies change."""
    gen = torch.Generator().manual_seed(1234)
    samples = []
    for n in (1000, 70_000, 300_000):
        base = torch.randn(n, generator=gen).to(torch.bfloat16).float()
        samples.append(((base + 0.01 * torch.randn(n, generator=gen)).to(torch.bfloat16).float() - base).abs())
    return samples


def _desc_order_int32_ok() -> bool:
    """Whether, on this build, sorting the int32 bits of non-negative float32 values descending gives
    exactly the permutation of sorting the floats (same order, same tie order, cheaper: no NaN passes).
    Checked once per process."""
    global _INT32_ORDER_OK
    if _INT32_ORDER_OK is None:
        _INT32_ORDER_OK = all(torch.equal(torch.argsort(w, descending=True),
                                          torch.argsort(w.view(torch.int32), descending=True))
                              for w in _tied_samples())
    return _INT32_ORDER_OK


def _compiled_top_k_ok() -> bool:
    """Whether the compiled top-k is here and keeps, on this build of torch, the very entries the first k of
    ``torch.argsort`` are (it follows libstdc++'s std::sort; another C++ library sorts ties otherwise).
    Checked once per process."""
    global _COMPILED_OK
    if _COMPILED_OK is None:
        _COMPILED_OK = _topk is not None and all(
            torch.equal(_compiled_top_k(w, k), _first_k(order, k))
            for w, order in ((w, torch.argsort(w, descending=True)) for w in _tied_samples())
            for k in (1, w.numel() // 3, w.numel() // 2, w.numel() - 1))
    return _COMPILED_OK


def _first_k(order: Tensor, k: int) -> Tensor:
    """The mask of the entries ``order`` puts first ``k``."""
    mask = torch.zeros(order.numel(), dtype=torch.bool, device=order.device)
    mask[order[:k]] = True
    return mask


_INT32_ORDER_OK: bool | None = None
_COMPILED_OK: bool | None = None
_FLOAT32_INF_BITS = 0x7F800000


def _compiled_top_k(values: Tensor, k: int) -> Tensor | None:
    """The top-k mask of ``|values|`` (flat, float32, CPU, contiguous) from evomerge/_topk.c, in O(n); None
    where it cannot say (a NaN, a degenerate input): the sort decides then."""
    mask = torch.empty(values.numel(), dtype=torch.bool)
    return mask if _topk.top_k_mask(values.detach().numpy(), mask.numpy(), k) == 0 else None


def _descending_order(magnitude: Tensor) -> Tensor:
    """``torch.argsort(magnitude, descending=True)`` (float32, flat), the identical permutation; the input
    is used as scratch. On CPU, non-negative non-NaN floats sort as their int32 bits, which is faster."""
    order = torch.empty(magnitude.numel(), dtype=torch.long, device=magnitude.device)
    if magnitude.device.type == "cpu" and magnitude.dtype == torch.float32 and _desc_order_int32_ok():
        bits = magnitude.view(torch.int32)
        low, high = torch.aminmax(bits)
        if int(low) >= 0 and int(high) <= _FLOAT32_INF_BITS:  # no sign bit set (not even -0.0), no NaN
            torch.sort(bits, descending=True, out=(bits, order))
            return order
    torch.sort(magnitude, descending=True, out=(magnitude, order))
    return order


def _ties_likely(magnitude: Tensor) -> bool:
    """A cheap guess (speed only, never the result): repeated values in a strided sample of 2048 entries
    mean the top-k cut very likely falls inside a run of ties (fp16/bf16 task vectors), so the sort will
    be needed anyway and a kthvalue pass first is wasted."""
    sample = magnitude[:: max(1, magnitude.numel() // 2048)]
    return sample.unique().numel() < sample.numel()


def _sorted_top_k(magnitude: Tensor, k: int) -> Tensor:
    """The top-k mask by torch alone (no compiler, or a GPU), on flat float32 magnitudes it may overwrite."""
    n = magnitude.numel()
    if not _ties_likely(magnitude):
        mask = magnitude >= torch.kthvalue(magnitude, n - k + 1).values
        if int(mask.sum()) == k:
            return mask
    return _first_k(_descending_order(magnitude), k)


def top_k_mask(values: Tensor, k: int) -> Tensor:
    """Mask of the ``k`` largest ``|values|`` of a flat tensor, the ones mergekit keeps: the first ``k`` of
    ``argsort(values.abs().float(), descending=True)``. Where more entries equal the k-th largest than fit
    (common in fp16/bf16 task vectors), which of them an unstable sort puts first depends on the whole
    tensor: evomerge/_topk.c follows that sort's partitions into the range holding the cut (O(n)); without
    it (or on a GPU), the same sort decides."""
    n = values.numel()
    if k >= n:
        return torch.ones_like(values, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    if values.device.type == "cpu" and _compiled_top_k_ok():
        mask = _compiled_top_k(values.float().contiguous(), k)
        if mask is not None:
            return mask
    return _sorted_top_k(values.abs().float(), k)  # a fresh tensor: the sort uses it as scratch


def magnitude_mask(delta: Tensor, density: float) -> Tensor:
    """TIES trim: keep the top ``int(density * numel)`` entries by magnitude (at least one)."""
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    k = max(1, int(density * delta.numel()))
    if k >= delta.numel():
        return torch.ones_like(delta, dtype=torch.bool)
    return top_k_mask(delta.reshape(-1), k).reshape(delta.shape)


def outlier_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Breadcrumbs: drop the largest ``gamma`` fraction and the smallest, keeping ``density`` of them."""
    n = delta.numel()
    keep = int(density * n)
    n_bottom = max(0, n - keep - int(gamma * n))
    order = torch.sort(delta.abs().reshape(-1).float()).indices
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    mask[order[n_bottom : n_bottom + keep]] = True
    return mask.reshape(delta.shape)


def random_mask(delta: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE: keep each entry with probability ``density``."""
    return torch.bernoulli(torch.full_like(delta, density), generator=generator)


def rank_mask(delta: Tensor, density: float, epsilon: float, generator: torch.Generator) -> Tensor:
    """DELLA: per row, keep probability rises with magnitude rank from density-eps to density+eps."""
    if density <= 0:
        return torch.zeros_like(delta)
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    n = rows.shape[1]
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(rows.dtype)
    rank_norm = ranks / (n - 1) if n > 1 else torch.full_like(rows, 0.5)
    mask = torch.bernoulli((density - epsilon) + rank_norm * 2 * epsilon, generator=generator)
    return mask.reshape(delta.shape)


def sparsify(delta: Tensor, how: Sparsifier, density: float, rescale: bool, *, gamma: float = 0.0,
             epsilon: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
    """Drop entries of one task vector as ``how`` says; ``rescale`` keeps its L1 norm."""
    if how == "none" or density >= 1:
        return delta
    if how == "magnitude":
        mask = magnitude_mask(delta, density)
    elif how == "outliers":
        mask = outlier_mask(delta, density, gamma)
    elif how == "random":
        mask = random_mask(delta, density, generator)
    else:
        mask = rank_mask(delta, density, epsilon, generator)
    return rescale_l1(delta, mask) if rescale else delta * mask


# ----------------------------------------------------------------------------- combination


def elect_sign_mask(weighted: Tensor) -> Tensor:
    """TIES sign election over stacked weighted deltas: keep entries agreeing with sign(sum), 0 -> +."""
    majority = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)
    return weighted.sign() == majority


def combine_deltas(stacked: Tensor, weight: list[float], *, consensus: bool, normalize: bool, lam: float) -> Tensor:
    """Weighted sum of stacked (already sparsified) deltas, with optional sign election and normalization.
    Works in place on ``stacked`` (the caller's scratch) to keep peak memory near one stack."""
    w = torch.tensor(weight, dtype=stacked.dtype, device=stacked.device).reshape(-1, *[1] * (stacked.dim() - 1))
    weighted = stacked.mul_(w)
    if consensus:
        mask = elect_sign_mask(weighted)
        divisor = mask.to(weighted.dtype).mul_(w).sum(dim=0) if normalize else None
        merged = weighted.mul_(mask).sum(dim=0)
        if divisor is not None:
            divisor[divisor == 0] = 1
    else:
        merged = weighted.sum(dim=0)
        divisor = None
        if normalize:
            divisor = w.sum(dim=0).expand_as(merged).clone()
            divisor[divisor.abs() < 1e-8] = 1
    if divisor is not None:
        merged.div_(divisor)
    return merged.mul_(lam) if lam != 1 else merged


_POOL: ThreadPoolExecutor | None = None
_PARALLEL_MIN_NUMEL = 1 << 16


def _pool() -> ThreadPoolExecutor:
    """Two workers: torch's sort runs on one core, so two task vectors' trims run side by side."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="evomerge-trim")
    return _POOL


def _task_vector_method(how: Sparsifier, consensus: bool) -> Callable[..., Tensor]:
    """Build the function of one task-vector method (task arithmetic, TIES, DARE, breadcrumbs, DELLA).
    ``stacked`` may pass the deltas already stacked (they are then its rows, and are overwritten)."""

    def merge(base: Tensor, deltas: list[Tensor], *, weight: list[float], density: list[float],
              normalize: bool, rescale: bool, lambda_: float, gamma: list[float] | None = None,
              epsilon: list[float] | None = None, generator: torch.Generator | None = None,
              stacked: Tensor | None = None) -> Tensor:
        if stacked is None:
            stacked = torch.stack(deltas)

        def trim(i: int) -> None:
            row = stacked[i]
            if how in ("magnitude", "outliers") and not rescale and density[i] < 1:
                mask = magnitude_mask(row, density[i]) if how == "magnitude" else \
                    outlier_mask(row, density[i], gamma[i] if gamma else 0.0)
                row.mul_(mask)  # the same products as ``row * mask``, without a copy
            else:
                row.copy_(sparsify(row, how, density[i], rescale, gamma=gamma[i] if gamma else 0.0,
                                   epsilon=epsilon[i] if epsilon else 0.0, generator=generator))

        if how != "none":
            # deterministic trims of large CPU tensors run two at a time; seeded ones keep the generator's order
            if (how in ("magnitude", "outliers") and len(deltas) > 1 and stacked.device.type == "cpu"
                    and stacked[0].numel() >= _PARALLEL_MIN_NUMEL):
                for future in [_pool().submit(trim, i) for i in range(len(deltas))]:
                    future.result()
            else:
                for i in range(len(deltas)):
                    trim(i)
        return combine_deltas(stacked, weight, consensus=consensus, normalize=normalize, lam=lambda_)

    return merge


def linear(base: Tensor | None, tensors: list[Tensor], *, weight: list[float], normalize: bool) -> Tensor:
    """``sum(w_i x_i) / sum(w_i)`` (the division only when ``normalize``)."""
    merged = sum(w * x for w, x in zip(weight, tensors, strict=True))
    return merged / sum(weight) if normalize else merged


def slerp_tensors(t: float, a: Tensor, b: Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation of two flattened tensors; linear when they are (anti)parallel."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    na, nb = fa.norm(), fb.norm()
    na = na if na > eps else torch.ones_like(na)
    nb = nb if nb > eps else torch.ones_like(nb)
    dot = ((fa / na) * (fb / nb)).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        return (1 - t) * a + t * b
    theta = torch.acos(dot)
    return (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)


def slerp(base: Tensor, tensors: list[Tensor], *, t: float) -> Tensor:
    """SLERP from the base (t=0) to the other model (t=1)."""
    return slerp_tensors(t, base, tensors[0])


def nuslerp(base: Tensor | None, tensors: list[Tensor], *, weight: list[float], nuslerp_flatten: bool,
            nuslerp_row_wise: bool) -> Tensor:
    """SLERP of two models (or their task vectors) at ``t = w_2 / (w_1 + w_2)``, whole or per row."""
    total = sum(weight)
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    a, b = tensors
    shape = a.shape
    if nuslerp_flatten:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    elif nuslerp_row_wise:
        a, b = a.transpose(0, -1), b.transpose(0, -1)
    ua = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    ub = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (ua * ub).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * a + t * b, out)
    if not nuslerp_flatten and nuslerp_row_wise:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def model_stock(base: Tensor, deltas: list[Tensor], *, filter_wise: bool) -> Tensor:
    """Model Stock: move from the base towards the mean by ``t = k cos / (1 + (k-1) cos)``."""
    shape = deltas[0].shape
    flat = [d.reshape(1, -1) if (not filter_wise or d.dim() < 2) else d.reshape(d.shape[0], -1)
            for d in deltas]
    cosines = []
    for i, a in enumerate(flat):
        for b in flat[i + 1 :]:
            norms = (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-6)
            cosines.append(((a * b).sum(dim=-1) / norms).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    k = len(deltas)
    denom = 1 + (k - 1) * cos
    singular = denom.abs() < 1e-6
    t = torch.where(singular, 0, k * cos / torch.where(singular, 1, denom))
    mean = torch.stack(flat).mean(dim=0)
    return (t * mean).reshape(shape)


# ----------------------------------------------------------------------------- one function per method name

task_arithmetic = _task_vector_method("none", consensus=False)
ties = _task_vector_method("magnitude", consensus=True)
dare_ties = _task_vector_method("random", consensus=True)
dare_linear = _task_vector_method("random", consensus=False)
breadcrumbs = _task_vector_method("outliers", consensus=False)
breadcrumbs_ties = _task_vector_method("outliers", consensus=True)
della = _task_vector_method("rank", consensus=True)
della_linear = _task_vector_method("rank", consensus=False)
