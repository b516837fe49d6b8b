"""Turn a local directory or a Hugging Face hub id into a local checkpoint directory.

A local directory is used as it is and never touches the network. A hub id (``YannQi/R-4B``) goes
through ``huggingface_hub.snapshot_download``, restricted to the files r4b reads, at ``revision``;
with ``HF_HUB_OFFLINE=1`` only the local HF cache is consulted.
"""

from __future__ import annotations

import os
from pathlib import Path

# What a checkpoint holds besides config.json and the weights, and r4b reads or carries along: the
# tokenizer, processor, chat-template and generation-config files (export copies these too).
CHECKPOINT_AUX_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    "processor_config.json", "video_preprocessor_config.json", "generation_config.json",
)
# Downloaded for a hub id: weights, configs, the files above, and any remote-code .py files (kept so
# that an export carries them along).
HUB_ALLOW_PATTERNS = ["*.safetensors", "model.safetensors.index.json", "config.json", *CHECKPOINT_AUX_FILES, "*.py"]


def hub_offline() -> bool:
    """HF_HUB_OFFLINE read now (huggingface_hub itself reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_repo_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "~")) and "\\" not in s


def resolve_checkpoint(path_or_repo: str | Path, revision: str | None = None) -> Path:
    """A local checkpoint directory for ``path_or_repo`` (downloading from the hub if needed)."""
    try:
        path = Path(path_or_repo).expanduser()
    except RuntimeError:  # "~someone/..." for a user that does not exist
        raise FileNotFoundError(f"{path_or_repo}: no such checkpoint directory.") from None
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to hub ids only; {path} is a local directory.")
        return path
    if path.exists():
        raise NotADirectoryError(f"{path} is a file; pass the checkpoint directory that holds config.json.")
    text = str(path_or_repo)
    if not _looks_like_repo_id(text):
        shown = repr(text) if text != text.strip() else text  # a stray space is visible when quoted
        raise FileNotFoundError(f"{shown}: no such checkpoint directory (and not a hub id of the form 'owner/name').")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # 'runs/ckpt' may be a mistyped local path as well as a hub id: every failure below says both
    local_note = f"there is no local directory {str(path)!r} (from {Path.cwd()})"
    offline = hub_offline()
    try:
        local = snapshot_download(text, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS, local_files_only=offline)
    except LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE is set and it is not in the local HF cache" if offline else "it could not be downloaded"
        raise FileNotFoundError(
            f"{text}: {local_note}, and as a hub id (revision {revision or 'main'}) {why}. Check the path, or pass "
            f"a hub id you can reach ({_one_line(e)})."
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise FileNotFoundError(f"{text}: {local_note}, and as a hub id (revision {revision or 'main'}) it is not "
                                f"on the hub ({_one_line(e)}).") from None
    except HFValidationError as e:
        raise FileNotFoundError(f"{text}: {local_note}, and it is not a valid hub id ({_one_line(e)}).") from None
    return Path(local)


def _one_line(error: BaseException) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())
