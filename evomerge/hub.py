"""Hugging Face Hub model ids (``org/name`` or ``org/name@revision``) resolved to a folder in the local cache.

Users copy model references from mergekit YAML and model cards, where a Hub id is the normal form. We hand
them to huggingface_hub's own cache (the one ``hf download`` and transformers fill) instead of keeping a
second copy, so a model downloaded once serves evomerge, transformers and mergekit alike. The cache is
always tried first, without network: a search opens the same models many times and must not depend on the
Hub being up once the files are there. Only when that misses and offline mode is off do we download, and
then only what a merge reads (config, safetensors weights, tokenizer files), not ``.bin`` or ``.gguf``
copies that a repository may also carry. Every failure is one :class:`SpecError` line that says what to
do, raised while references are resolved, i.e. before any compute.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub import errors as hf_errors
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import validate_repo_id

from evomerge.errors import SpecError

# What a merge needs from a repository: its config, the safetensors weights (single file or shards with
# their index), and the tokenizer in any of its on-disk forms (tokenizer.json, sentencepiece
# tokenizer.model, vocab / merges text files, tiktoken files, a chat template file).
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
# huggingface_hub >= 2 tells a partial snapshot (an interrupted download) from a missing one; older
# versions return the partial folder, whose gaps open_checkpoint then names file by file.
_INCOMPLETE: type[Exception] | tuple[()] = getattr(hf_errors, "IncompleteSnapshotError", ())


def parse_hub_id(ref: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``ref`` has the shape of a Hub model id ``org/name[@revision]``, else None.

    The namespace is required: a bare ``name`` is far more likely a mistyped local folder than one of the
    few legacy un-namespaced Hub repositories. The id itself is checked with huggingface_hub's validator,
    so paths such as ``./x``, ``../x/y``, ``/abs/path`` or ``a/b/c`` are never taken for Hub ids. Repo ids
    cannot hold ``@``, so the first ``@`` starts the revision (which may itself hold ``/``, as
    ``refs/pr/1`` does).
    """
    repo_id, at, revision = ref.partition("@")
    if repo_id.count("/") != 1 or (at and not revision):
        return None
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return repo_id, revision or None


def resolve_hub_model(repo_id: str, revision: str | None = None) -> Path:
    """The snapshot folder of ``repo_id`` at ``revision`` (default branch when None) in the local HF cache.

    Read from the cache without network; on a miss, downloaded unless offline mode (``HF_HUB_OFFLINE``) is
    on. Raises SpecError, naming the id, the revision and what to do, when neither works.
    """
    name = f"{repo_id}@{revision}" if revision else repo_id
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=DOWNLOAD_PATTERNS,
                                      local_files_only=True))
    except LocalEntryNotFoundError as err:  # not cached, or (IncompleteSnapshotError) cached in part
        missing = _miss_reason(repo_id, revision, err)
    except (OSError, ValueError) as err:  # an unreadable cache, a revision huggingface_hub refuses
        raise SpecError(f"model {name}: cannot read it from the Hugging Face cache ({constants.HF_HUB_CACHE}): "
                        f"{_first_line(err)}") from None
    if constants.HF_HUB_OFFLINE:
        command = download_command(repo_id, revision)
        raise SpecError(f"model {name}: no local folder of that name, and {missing} while HF_HUB_OFFLINE is "
                        f"set: download it first, with network access, by `{command}`") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=DOWNLOAD_PATTERNS))
    except RevisionNotFoundError:
        raise SpecError(f"model {name}: the Hugging Face Hub has no revision {revision!r} of {repo_id}") from None
    except GatedRepoError:
        raise SpecError(f"model {name} is gated: accept its terms on huggingface.co, then log in with "
                        f"`hf auth login`") from None
    except RepositoryNotFoundError:
        raise SpecError(f"model {name}: no local folder of that name, and no such repository on the Hugging "
                        f"Face Hub (if it is private, log in with `hf auth login`)") from None
    except LocalEntryNotFoundError:
        raise SpecError(f"model {name}: no local folder of that name, {missing}, and the Hugging Face Hub "
                        f"({constants.ENDPOINT}) cannot be reached") from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise SpecError(f"model {name}: download from the Hugging Face Hub failed: {_first_line(err)}") from None


def download_command(repo_id: str, revision: str | None) -> str:
    """The ``hf`` command (huggingface_hub's CLI) that puts the model into the cache :func:`resolve_hub_model` reads."""
    return f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")


def _miss_reason(repo_id: str, revision: str | None, err: Exception) -> str:
    """Why the cache could not serve the model, in words for the error line (with the cache location)."""
    where = f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if isinstance(err, _INCOMPLETE):
        return f"its snapshot in {where} is incomplete (an interrupted download?)"
    refs = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs"
    cached = sorted(str(p.relative_to(refs)) for p in refs.rglob("*") if p.is_file()) if refs.is_dir() else []
    if cached:
        return (f"revision {revision or constants.DEFAULT_REVISION} is not in {where} "
                f"(cached revisions: {', '.join(cached)})")
    return f"it is not in {where}"


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else err.__class__.__name__
