"""LoRA adapters as merge inputs, in mergekit's ``BASE+ADAPTER`` model reference form.

mergekit's ``ModelReference`` splits a reference at ``+`` into a model and a LoRA adapter (exactly one ``+``;
each side may carry its own ``@revision``), merges the adapter into the model with PEFT's
``merge_and_unload()`` and writes that full fine-tune into a cache folder. We fold the adapter in on the
fly instead: :func:`open_adapted` returns an :class:`AdaptedCheckpoint` that presents the base's tensors
(same names, shapes and dtypes, the base's ``config`` and folder) and whose :meth:`~AdaptedCheckpoint.read`
returns a targeted tensor with the adapter merged in. Nothing of the fine-tune is written to disk; the
streaming merge and the live worker read it through the ordinary :class:`~evomerge.checkpoint.Checkpoint`
contract and need no change.

What a tensor reads as, step for step PEFT's loading (``PeftModel.from_pretrained``, which upcasts fp16 and
bf16 adapter weights to float32 by default) and then its ``merge_and_unload()`` (``safe_merge=False``); with
``work`` = float64 for a float64 base tensor, else float32:

- a full tensor the adapter saved (``modules_to_save``, trained biases of ``bias: all | lora_only``, the
  base layer of a targeted embedding) first replaces the base's, cast to the base dtype;
- a ``Linear`` (or transformers ``Conv1D``) weight ``W``: ``W += transpose(B @ A, fan_in_fan_out) * scaling``
  with ``A``, ``B`` in ``work``, added in place into ``W``'s dtype (one rounding, as torch's mixed-dtype
  ``+=`` does it);
- an ``Embedding`` weight ``W``: ``W += ((B @ A).T * scaling).to(W.dtype)`` (PEFT's embedding merge casts the
  delta first: two roundings for fp16/bf16 bases, exactly as PEFT);
- a bias under ``lora_bias``: ``bias += lora_B.bias * scaling``;

where ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), ``r`` and ``lora_alpha``
per module from ``rank_pattern`` / ``alpha_pattern`` by PEFT's own matching rule (the first pattern ``p``
with ``re.match(rf"(.*\\.)?({p})$", module)``). ``fan_in_fan_out``: PEFT transposes exactly for Conv1D modules
(it overrides the flag per module type), which a folder of tensors does not name; a module's shapes decide
(``B @ A`` fits the weight as it is, or transposed), and a square weight, which fits both ways, follows the
orientation all non-square modules of the adapter show, else the config's flag.

Refused before any compute, each with one :class:`SpecError` line: a missing or malformed adapter folder,
config or weights file (only ``adapter_model.safetensors`` is read, never a pickled ``.bin``); a PEFT type
other than LoRA; LoRA variants whose merge is not ``B @ A`` (DoRA, QA-LoRA, aLoRA, Arrow, VeLoRA, MonteCLoRA,
KaSA, block-diagonal LoRA, MiCA), initialisations that change the base weights and so need a base we do not
have (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA, unless saved converted), layer replication, trainable tokens,
Megatron layers, ``target_parameters``, convolution layers; any config field we do not know with a value
set (it may change the merge); adapter tensors that name a tensor the base lacks, or whose shapes (``A``, ``B``,
rank, saved full tensors) do not fit the base.

The adapter's ``base_model_name_or_path`` is not compared with the base: it is often a path on the training
machine, a Hub id of which the base is a local copy or a re-upload, or empty, and applying a LoRA to a sibling
fine-tune of its base (same architecture and shapes) is a use mergekit's ``+`` form serves on purpose. What
must match is checked strictly instead: every adapter tensor names a base tensor and fits its shape.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.checkpoint import (
    Checkpoint,
    TensorInfo,
    folder_names,
    read_header,
    read_json_object,
)
from evomerge.errors import SpecError
from evomerge.refs import ADAPTER_CONFIG, lexists, resolve_model_path

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the base model's module names

# config fields whose any truthy value makes a variant we do not merge (field -> its name)
VARIANTS = {
    "use_dora": "DoRA", "use_qalora": "QA-LoRA", "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "alora_invocation_tokens": "aLoRA", "arrow_config": "Arrow", "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA", "kasa_config": "KaSA", "layer_replication": "layer replication",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)", "megatron_config": "Megatron layers",
    "target_parameters": "LoRA on parameters (target_parameters)",
}
# init_lora_weights values (prefixes) whose adapter is relative to a base PEFT modified at initialisation
# (saved without PEFT's conversion, which resets the field to true), or that make a variant (MiCA)
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")
# config fields that do not change the merge whatever their value (the tensors say what is targeted)
BENIGN = {
    "r", "lora_alpha", "use_rslora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "init_lora_weights",
    "lora_bias", "bias", "modules_to_save", "target_modules", "exclude_modules", "layers_to_transform",
    "layers_pattern", "lora_dropout", "peft_type", "task_type", "inference_mode", "peft_version", "revision",
    "base_model_name_or_path", "auto_mapping", "megatron_core", "qalora_group_size", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", "ensure_weight_tying", "runtime_config",
}
# architectures whose projections are transformers' Conv1D (weights stored [in, out]), where PEFT transposes
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|"
                      r"lora_embedding_B)$")
LORA_SEGMENT = re.compile(r"(?:^|\.)(lora_[A-Za-z0-9_]*)(?:\.|$)")


@dataclass(frozen=True)
class LoraFactor:
    """How one base tensor changes: ``b`` (and ``a``) name tensors of the adapter file."""

    kind: str  # "linear" | "embedding" | "bias"
    b: str
    a: str | None
    scaling: float
    transpose: bool = False


@dataclass(frozen=True)
class Patch:
    replace: str | None = None  # a full tensor of the adapter file that first replaces the base's
    lora: LoraFactor | None = None


@dataclass
class AdaptedCheckpoint(Checkpoint):
    """A base checkpoint with a LoRA adapter merged into its tensors as they are read."""

    adapter: Path
    weights: Checkpoint  # the adapter's own tensors
    patches: dict[str, Patch]

    def stored(self, name: str) -> bool:
        return name not in self.patches

    def view(self, name: str) -> torch.Tensor:
        """A patched tensor is computed (the adapter folded in) each time; the others are the base's maps."""
        return self.read(name) if name in self.patches else super().view(name)

    def read(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        patch = self.patches.get(name)
        if patch is None:
            return super().read(name, device)
        if patch.replace is None:
            weight = super().read(name, device)
        else:  # PEFT loads the saved tensor into the base module's parameter: a copy in its dtype
            weight = self.weights.read(patch.replace, device).to(self.tensors[name].dtype)
        lora = patch.lora
        if lora is None:
            return weight
        work = torch.float64 if weight.dtype == torch.float64 else torch.float32
        b = self.weights.read(lora.b, device).to(work)
        if lora.kind == "bias":  # lora.Linear.merge: bias.data += lora_B.bias * scaling
            weight += b * lora.scaling
            return weight
        a = self.weights.read(lora.a, device).to(work)
        delta = b @ a
        if lora.transpose:
            delta = delta.T
        delta = delta * lora.scaling  # get_delta_weight: transpose(B @ A, fan_in_fan_out) * scaling
        if lora.kind == "embedding":  # lora.Embedding.merge: weight += delta.to(weight.dtype)
            weight += delta.to(weight.dtype)
        else:  # lora.Linear.merge: weight += delta (computed in work, rounded once into weight's dtype)
            weight += delta
        return weight


def open_adapted(base: Checkpoint, adapter_ref: str, ref: str) -> AdaptedCheckpoint:
    """``base`` with the LoRA adapter ``adapter_ref`` (a folder or Hub id) merged into it on read; every
    check runs here, on headers and the config alone, before any tensor is read."""
    folder = resolve_model_path(adapter_ref)
    where = f"LoRA adapter {adapter_ref}" + (f" ({folder})" if str(folder) != adapter_ref else "")
    if not lexists(folder):
        raise SpecError(f"LoRA adapter folder not found: {adapter_ref} (in {ref})")
    names = folder_names(folder, f"{adapter_ref} (the LoRA adapter in {ref})")
    if ADAPTER_CONFIG not in names:
        hint = (": it holds a full model (config.json), not an adapter; merge it as a model of its own"
                if "config.json" in names else ": not a PEFT adapter folder")
        raise SpecError(f"{where}: no {ADAPTER_CONFIG}{hint}")
    config = read_json_object(folder / ADAPTER_CONFIG)
    r, alpha, ranks, alphas = _check_config(config, where)
    weights_file = folder / ADAPTER_WEIGHTS
    if ADAPTER_WEIGHTS not in names:
        found = (f" (found {ADAPTER_WEIGHTS.replace('.safetensors', '.bin')}: re-save it with PEFT's "
                 f"save_pretrained(..., safe_serialization=True); pickled weights are not read)"
                 if "adapter_model.bin" in names else "")
        raise SpecError(f"{where}: no {ADAPTER_WEIGHTS}{found}")
    stored = read_header(weights_file)
    if not stored:
        raise SpecError(f"{weights_file}: holds no tensors")
    factors: dict[str, dict[str, str]] = {}
    replace: dict[str, str] = {}
    for key in stored:
        name = key.removeprefix(PEFT_PREFIX)
        match = LORA_KEY.match(name)
        if match:
            factors.setdefault(match["module"], {})[match["part"]] = key
            continue
        segment = LORA_SEGMENT.search(name)
        if segment:
            what = "DoRA's magnitude vector" if segment[1] == "lora_magnitude_vector" else f"{segment[1]}"
            raise SpecError(f"{where}: tensor {key} is {what}, which evomerge does not merge (plain LoRA only)")
        target = name.replace(".base_layer.", ".")
        info = _base_tensor(base, target, key, where)
        if info.shape != stored[key].shape or not stored[key].dtype.is_floating_point:
            raise SpecError(f"{where}: tensor {key} of shape {list(stored[key].shape)} ({stored[key].dtype}) "
                            f"cannot replace {target} of shape {list(info.shape)} in {base.path}")
        if target in replace:
            raise SpecError(f"{where}: tensors {replace[target]} and {key} both replace {target}")
        replace[target] = key
    lora = _lora_factors(base, stored, factors, config, r, alpha, ranks, alphas, where)
    patches = {n: Patch(replace=replace.get(n), lora=lora.get(n)) for n in {*replace, *lora}}
    weights = Checkpoint(path=folder, config=config, tensors=stored)
    return AdaptedCheckpoint(path=base.path, config=base.config, tensors=base.tensors, adapter=folder,
                             weights=weights, patches=patches)


def _check_config(config: dict, where: str) -> tuple[int, float, dict, dict]:
    """``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``; refuses what we would merge wrongly."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise SpecError(f"{where}: peft_type is {peft_type!r}; only LoRA adapters (peft_type LORA) are merged")
    for field, variant in VARIANTS.items():
        if config.get(field):
            raise SpecError(f"{where}: uses {variant} ({field}: {_short(config[field])}), which evomerge does not "
                            f"merge; merge it into its base with PEFT's merge_and_unload() and use that folder")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise SpecError(f"{where}: init_lora_weights is {init!r}, whose adapter only fits the base PEFT modified at "
                        f"initialisation; save it converted (save_pretrained(..., "
                        f"path_initial_model_for_weight_conversion=...)) or merge it with PEFT")
    unknown = sorted(k for k, v in config.items() if k not in BENIGN and k not in VARIANTS and v not in
                     (None, False, "", [], {}, 0))
    if unknown:
        raise SpecError(f"{where}: {ADAPTER_CONFIG} sets {unknown[0]}={_short(config[unknown[0]])}, which evomerge "
                        f"does not know and so cannot merge faithfully")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not _positive_int(r):
        raise SpecError(f"{where}: r must be a positive integer, got {_short(r)}")
    if not _number(alpha):
        raise SpecError(f"{where}: lora_alpha must be a number, got {_short(alpha)}")
    patterns = []
    for field, ok in (("rank_pattern", _positive_int), ("alpha_pattern", _number)):
        value = config.get(field) or {}
        if not isinstance(value, dict) or not all(isinstance(k, str) and ok(v) for k, v in value.items()):
            raise SpecError(f"{where}: {field} must map module patterns to "
                            f"{'positive integers' if field == 'rank_pattern' else 'numbers'}")
        for key in value:
            try:
                re.compile(key)
            except re.error as err:
                raise SpecError(f"{where}: {field} key {key!r} is not a regular expression ({err})") from None
        patterns.append(value)
    for field in ("fan_in_fan_out", "use_rslora", "lora_bias"):
        if not isinstance(config.get(field, False), bool):
            raise SpecError(f"{where}: {field} must be true or false, got {_short(config[field])}")
    return r, alpha, patterns[0], patterns[1]


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's ``get_pattern_key``: the first pattern ``p`` with ``re.match(rf"(.*\\.)?({p})$", module)``."""
    key = next((p for p in patterns if re.match(rf"(.*\.)?({p})$", module)), module)
    return patterns.get(key, default)


def _lora_factors(base: Checkpoint, stored: dict[str, TensorInfo], factors: dict[str, dict[str, str]],
                  config: dict, r: int, alpha: float, ranks: dict, alphas: dict, where: str) -> dict[str, LoraFactor]:
    """Each targeted base tensor and its factors, with every shape checked against the base."""
    out: dict[str, LoraFactor] = {}
    square: list[tuple[str, str, str, float]] = []  # weights that fit B @ A either way
    shown: set[bool] = set()  # orientations the non-square modules show
    for module, parts in sorted(factors.items()):
        rank = _pattern_value(ranks, module, r)
        module_alpha = _pattern_value(alphas, module, alpha)
        scaling = module_alpha / math.sqrt(rank) if config.get("use_rslora", False) else module_alpha / rank
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_part, b_part = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        if a_part not in parts or b_part not in parts or (embedding and len(parts) > 2):
            raise SpecError(f"{where}: module {module} has {', '.join(sorted(parts))}; a LoRA module needs "
                            f"{a_part} and {b_part}")
        a, b = stored[parts[a_part]], stored[parts[b_part]]
        target = f"{module}.weight"
        weight = _base_tensor(base, target, parts[a_part], where)
        for key, info in ((parts[a_part], a), (parts[b_part], b)):
            if not info.dtype.is_floating_point:
                raise SpecError(f"{where}: tensor {key} is {info.dtype}, not a floating-point tensor")
        if len(a.shape) != 2 or len(b.shape) != 2 or len(weight.shape) != 2:
            raise SpecError(f"{where}: module {module}: LoRA factors {list(a.shape)} and {list(b.shape)} for a base "
                            f"weight of shape {list(weight.shape)}: only 2-D weights (linear, Conv1D, embedding "
                            f"layers) are merged, not convolutions")
        if a.shape[0] != rank or b.shape[1] != rank:
            raise SpecError(f"{where}: module {module}: {a_part} {list(a.shape)} and {b_part} {list(b.shape)} do not "
                            f"have rank r={rank} of {ADAPTER_CONFIG}")
        if not weight.dtype.is_floating_point:
            raise SpecError(f"{where}: module {module}: base tensor {target} is {weight.dtype}, not floating-point")
        product = (b.shape[0], a.shape[1])  # B @ A
        if embedding:
            if weight.shape != product[::-1]:
                raise SpecError(f"{where}: module {module}: {a_part} {list(a.shape)} and {b_part} {list(b.shape)} do "
                                f"not fit {target} of shape {list(weight.shape)} in {base.path}")
            out[target] = LoraFactor("embedding", parts[b_part], parts[a_part], scaling, transpose=True)
        else:
            fits = {flip for flip, shape in ((False, product), (True, product[::-1])) if weight.shape == shape}
            if not fits:
                raise SpecError(f"{where}: module {module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not "
                                f"fit {target} of shape {list(weight.shape)} in {base.path}")
            if len(fits) == 1:
                shown |= fits
                out[target] = LoraFactor("linear", parts[b_part], parts[a_part], scaling, transpose=fits.pop())
            else:
                square.append((target, parts[b_part], parts[a_part], scaling))
        if "lora_B.bias" in parts:
            bias = stored[parts["lora_B.bias"]]
            target_bias = f"{module}.bias"
            info = _base_tensor(base, target_bias, parts["lora_B.bias"], where)
            if info.shape != bias.shape or len(bias.shape) != 1 or bias.shape[0] != b.shape[0]:
                raise SpecError(f"{where}: module {module}: lora_B.bias {list(bias.shape)} does not fit {target_bias} "
                                f"of shape {list(info.shape)} in {base.path}")
            out[target_bias] = LoraFactor("bias", parts["lora_B.bias"], None, scaling)
    # a square weight shows no orientation: PEFT transposes exactly for Conv1D layers (and ignores the config
    # flag), so the other modules' orientation decides, else the architecture's layer type
    flip = shown.pop() if len(shown) == 1 else base.config.get("model_type") in CONV1D_MODEL_TYPES
    for target, b_key, a_key, scaling in square:
        out[target] = LoraFactor("linear", b_key, a_key, scaling, transpose=flip)
    return out


def _base_tensor(base: Checkpoint, name: str, key: str, where: str) -> TensorInfo:
    if name not in base.tensors:
        raise SpecError(f"{where}: tensor {key} targets {name}, which the base {base.path} does not have "
                        f"(an adapter for another architecture?)")
    return base.tensors[name]


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short(value: object) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."
