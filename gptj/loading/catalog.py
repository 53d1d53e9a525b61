"""What `gptj models` lists: the bundled model, models in the Hugging Face cache, and
model folders or GGUF files in the models directories (GPTJ_MODELS, else ~/.cache/gptj/models:
where `gptj quantize` and `gptj make-random-checkpoint` write by default), each with its
quantization as stored and its size on disk."""

from __future__ import annotations

import json
import re
from pathlib import Path

from gptj.loading.resolve import model_dirs, model_name, models_dir

__all__ = ["default_output", "gguf_quantization", "list_models", "model_dirs", "stored_quantization"]

# A GGUF file's quantization, as its name carries it (llama.cpp's naming: Q4_K_M, Q8_0, IQ4_XS, F16)
_GGUF_TYPE = re.compile(r"(?<![A-Za-z0-9])(I?Q\d(?:_[A-Z0-9]+)*|TQ\d_\d|MXFP4|BF16|F16|F32)(?![A-Za-z0-9])",
                        re.IGNORECASE)


def _folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _config_of(folder: Path) -> dict | None:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return config if isinstance(config, dict) else None


def _arch_of(folder: Path) -> str | None:
    config = _config_of(folder)
    arch = config.get("model_type") if config else None
    return arch if isinstance(arch, str) else None


def stored_quantization(folder: Path) -> str:
    """A model folder's weights as stored: int8/int4 for a `gptj quantize` folder, else the
    checkpoint's dtype (float16, float32, ...) as its config names it, or "?"."""
    config = _config_of(folder) or {}
    quant = config.get("quantization_config")
    mode = quant.get("mode") if isinstance(quant, dict) else None
    dtype = config.get("torch_dtype") or config.get("dtype")
    value = mode or dtype
    return value if isinstance(value, str) else "?"


def gguf_quantization(name: str) -> str:
    """A GGUF file's quantization from its name (`SmolLM2-135M-Instruct.Q4_1.gguf` -> Q4_1), or "gguf"."""
    match = _GGUF_TYPE.search(Path(name).name.removesuffix(".gguf"))
    return match.group(1).upper() if match else "gguf"


def _is_ggml(path: Path) -> bool:
    """A legacy GGML model file (magic 0x67676d6c), as gptj.load reads it."""
    try:
        with path.open("rb") as f:
            return f.read(4) == (0x67676D6C).to_bytes(4, "little")
    except OSError:
        return False


def default_output(src: str | None, suffix: str) -> Path:
    """Where a model written from `src` goes when no path is given: the models directory, named
    after the source and `suffix` (`EleutherAI/gpt-j-6b@float16`, "-int8" -> .../gpt-j-6b-int8),
    so that `gptj models` lists it and `--model` finds it by that name."""
    base = model_name(src).rstrip("/").rsplit("/", 1)[-1]
    base = base.split("@", 1)[0].split(":", 1)[0] or "model"
    return models_dir() / f"{base}{suffix}"


def list_models(extra_dirs: list[str] | None = None) -> list[dict]:
    rows: list[dict] = []
    try:
        from gptj.tokenizer import bundled_gguf_path

        path = bundled_gguf_path()
        rows.append({"name": "SmolLM2-135M-Instruct (default)", "architecture": "llama", "size_bytes": path.stat().st_size,
                     "quantization": gguf_quantization(path.name), "source": "bundled", "path": str(path)})
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
                                         "size_bytes": f.size_on_disk, "quantization": gguf_quantization(f.file_name),
                                         "source": "hf-cache", "path": str(f.file_path)})
                    continue
                rows.append({"name": f"{repo.repo_id}@{refs}", "architecture": arch, "size_bytes": rev.size_on_disk,
                             "quantization": stored_quantization(Path(rev.snapshot_path)), "source": "hf-cache",
                             "path": str(rev.snapshot_path)})
    except Exception:  # no cache yet, or an unreadable one: nothing to list
        pass

    seen: set[Path] = set()
    for d in [*model_dirs(), *(Path(p).expanduser() for p in extra_dirs or [])]:
        if not d.is_dir() or d.resolve() in seen:  # --dir naming the models directory: listed once
            continue
        seen.add(d.resolve())
        for entry in sorted(e for e in d.iterdir() if not e.name.startswith(".")):  # not half-written ones
            if entry.is_dir() and (arch := _arch_of(entry)):
                rows.append({"name": entry.name, "architecture": arch, "size_bytes": _folder_size(entry),
                             "quantization": stored_quantization(entry), "source": "local", "path": str(entry)})
            elif entry.suffix == ".gguf":
                rows.append({"name": entry.stem, "architecture": "gguf", "size_bytes": entry.stat().st_size,
                             "quantization": gguf_quantization(entry.name), "source": "local", "path": str(entry)})
            elif entry.suffix == ".bin" and entry.is_file() and _is_ggml(entry):
                rows.append({"name": entry.stem, "architecture": "ggml", "size_bytes": entry.stat().st_size,
                             "quantization": "ggml", "source": "local", "path": str(entry)})
    return rows
