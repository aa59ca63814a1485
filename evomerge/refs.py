"""Model references: a folder, ``demo:NAME`` for the built-in zoo, a Hub id ``org/name[@revision]`` and mergekit's
``BASE+ADAPTER``. Resolving one reads no weights and imports no torch, so the configuration layer can check them."""

from __future__ import annotations

import os
from pathlib import Path

from evomerge.errors import SpecError

ADAPTER_CONFIG = "adapter_config.json"


def lexists(path: str | Path) -> bool:
    """Whether a path names something here, a broken or looping link included (so that a local path always wins
    over a Hub id, and its fault is reported as its own); False for a name the file system cannot hold."""
    return os.path.lexists(os.path.expanduser(path))


def split_adapter_ref(ref: str) -> tuple[str, str] | None:
    """``(base, adapter)`` for mergekit's ``BASE+ADAPTER`` form, None for a plain reference.

    As mergekit's ``ModelReference`` parses it, a ``+`` separates a model from its LoRA adapter and a
    reference holds at most one. An existing local path wins here as it does over a Hub id, so a folder whose
    name holds a ``+`` stays a folder."""
    if "+" not in ref or lexists(ref):
        return None
    parts = [p.strip() for p in ref.split("+")]
    if len(parts) != 2 or not all(parts):
        raise SpecError(f"model reference {ref}: expected BASE+ADAPTER (mergekit's form: one '+' between a model "
                        f"and its LoRA adapter folder or Hub id)")
    return parts[0], parts[1]


def named_models(ref: str) -> list[str]:
    """The model references inside a reference: ``[base, adapter]`` for ``BASE+ADAPTER``, else ``[ref]``."""
    parts = split_adapter_ref(ref)
    return [ref] if parts is None else list(parts)


def model_folders(ref: str) -> list[Path]:
    """Every folder a reference reads (the base's and, for ``BASE+ADAPTER``, the adapter's): the inputs an
    output folder must stay clear of."""
    parts = split_adapter_ref(ref)
    return [resolve_model_path(ref)] if parts is None else [resolve_model_path(p) for p in parts]


def resolve_model_path(ref: str) -> Path:
    """A model reference as a folder: ``demo:NAME`` for the built-in zoo, an existing path, or a Hugging
    Face Hub id ``org/name[@revision]`` (its snapshot in the local HF cache, see :mod:`evomerge.hub`).

    An existing local path always wins over the Hub, so a folder that happens to be named like a Hub id
    is never shadowed. Any other reference is returned as a path, and open_checkpoint reports it missing.
    For mergekit's ``BASE+ADAPTER`` form (a LoRA adapter, see :mod:`evomerge.lora`) it is the base's folder,
    the one that holds the config and tokenizer (``model_folders`` gives the adapter's too).
    """
    parts = split_adapter_ref(ref)
    if parts is not None:
        return resolve_model_path(parts[0])
    if ref.startswith("demo:"):
        from evomerge.demo import model_path

        try:
            return model_path(ref.removeprefix("demo:"))
        except KeyError as err:
            raise SpecError(str(err.args[0])) from None
    hub_id = hub_id_of(ref)
    if hub_id is None:
        return Path(ref).expanduser()
    from evomerge.hub import resolve_hub_model  # huggingface_hub loads in a quarter second: only when needed

    return resolve_hub_model(*hub_id)


def hub_id_of(ref: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``ref`` names a Hub model rather than a demo model or an existing path;
    for ``BASE+ADAPTER``, the base's (the model whose weights and config the merge starts from)."""
    parts = split_adapter_ref(ref)
    if parts is not None:
        return hub_id_of(parts[0])
    if ref.startswith("demo:") or lexists(ref):
        return None
    from evomerge.hub import parse_hub_id

    return parse_hub_id(ref)
