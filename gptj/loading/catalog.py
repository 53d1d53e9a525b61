"""What `gptj models` lists: the bundled model, models in the Hugging Face cache, and
model folders or GGUF files in the user's model directories."""

from __future__ import annotations

import json
import os
from pathlib import Path


def _folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _arch_of(folder: Path) -> str | None:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return config.get("model_type") if isinstance(config, dict) else None


def _is_ggml(path: Path) -> bool:
    """A legacy GGML model file (magic 0x67676d6c), as gptj.load reads it."""
    try:
        with path.open("rb") as f:
            return f.read(4) == (0x67676D6C).to_bytes(4, "little")
    except OSError:
        return False


def model_dirs() -> list[Path]:
    base = os.environ.get("GPTJ_MODELS") or os.path.expanduser("~/.local/share/gptj/models")
    return [Path(p) for p in base.split(os.pathsep) if p]


def list_models(extra_dirs: list[str] | None = None) -> list[dict]:
    rows: list[dict] = []
    try:
        from gptj.tokenizer import bundled_gguf_path

        path = bundled_gguf_path()
        rows.append({"name": "SmolLM2-135M-Instruct (default)", "architecture": "llama", "size_bytes": path.stat().st_size,
                     "source": "bundled", "path": str(path)})
    except (ImportError, FileNotFoundError, ModuleNotFoundError):
        pass

    try:
        from huggingface_hub import scan_cache_dir

        for repo in scan_cache_dir().repos:
            if repo.repo_type != "model":
                continue
            for rev in repo.revisions:
                refs = ",".join(sorted(rev.refs)) or rev.commit_hash[:8]
                arch = _arch_of(Path(rev.snapshot_path))
                if arch is None:  # a GGUF repo (`gptj pull owner/name:QUANT`): its files, by quantization
                    for f in sorted(rev.files, key=lambda f: f.file_name):
                        if f.file_name.endswith(".gguf") and not f.file_name.startswith("mmproj"):
                            rows.append({"name": f"{repo.repo_id}@{refs} {f.file_name}", "architecture": "gguf",
                                         "size_bytes": f.size_on_disk, "source": "hf-cache", "path": str(f.file_path)})
                    continue
                rows.append({"name": f"{repo.repo_id}@{refs}", "architecture": arch, "size_bytes": rev.size_on_disk,
                             "source": "hf-cache", "path": str(rev.snapshot_path)})
    except Exception:  # no cache yet, or an unreadable one: nothing to list
        pass

    for d in [*model_dirs(), *(Path(p) for p in extra_dirs or [])]:
        if not d.is_dir():
            continue
        for entry in sorted(e for e in d.iterdir() if not e.name.startswith(".")):  # not half-written ones
            if entry.is_dir() and (arch := _arch_of(entry)):
                rows.append({"name": entry.name, "architecture": arch, "size_bytes": _folder_size(entry),
                             "source": "local", "path": str(entry)})
            elif entry.suffix == ".gguf":
                rows.append({"name": entry.stem, "architecture": "gguf", "size_bytes": entry.stat().st_size,
                             "source": "local", "path": str(entry)})
            elif entry.suffix == ".bin" and entry.is_file() and _is_ggml(entry):
                rows.append({"name": entry.stem, "architecture": "ggml", "size_bytes": entry.stat().st_size,
                             "source": "local", "path": str(entry)})
    return rows
