"""Which file or folder a model name means: the bundled GGUF, a path, or a repo id in the local
Hugging Face cache (with a revision), never a half-pulled one."""

from __future__ import annotations

import os
from pathlib import Path

from gptj.errors import ModelLoadError

DEFAULT_MODEL = "smollm2"
# `gptj pull` writes this into a snapshot folder before downloading and removes it once every
# file is there: a folder that still has it is never loaded (its text: what to pull again).
INCOMPLETE_MARKER = ".gptj-pull-incomplete"


def resolve(name_or_path: str | None, revision: str | None = None) -> Path:
    """A GGUF file or a Hugging Face folder for a name, path or repo id."""
    if name_or_path in (None, "", "default", "smollm2", "SmolLM2-135M-Instruct"):
        from gptj.tokenizer import bundled_gguf_path

        return bundled_gguf_path()
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/")):
        repo, _, rev = name_or_path.partition("@")
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(repo, revision=revision or rev or None, local_files_only=True,
                                          cache_dir=hf_cache_dir()))
        except Exception as exc:
            # `gptj pull` takes only the files a model needs; huggingface_hub calls such a
            # snapshot incomplete against the repo's full file listing, and names its folder.
            partial = getattr(exc, "snapshot_path", None)
            if partial and (Path(partial) / "config.json").exists():
                return Path(partial)
            raise ModelLoadError(
                f"model {name_or_path!r} is not in the local Hugging Face cache ({exc.__class__.__name__}); "
                f"download it with: gptj pull {repo}" + (f" --revision {revision or rev}" if revision or rev else "")
            ) from None
    raise ModelLoadError(f"model {name_or_path!r} not found: not a file, a folder, or a repo id like EleutherAI/gpt-j-6b")


def hf_cache_dir() -> str | None:
    """The hub cache as the environment says now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None
