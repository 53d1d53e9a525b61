"""Which file or folder a model name means: the bundled GGUF, a path, or a repo id in the local
Hugging Face cache (with a revision), never a half-pulled one."""

from __future__ import annotations

import os
from pathlib import Path

from gptj.errors import ModelLoadError

DEFAULT_MODEL = "smollm2"
BUNDLED_NAMES = (None, "", "default", "smollm2", "SmolLM2-135M-Instruct")  # what names the bundled model
# The bundled model loads as int8 unless a quantization is asked for: it decodes several times
# faster than float32 with the same perplexity (README: Speed). One default for every surface.
BUNDLED_QUANTIZATION = "int8"
# `gptj pull` writes this into a snapshot folder before downloading and removes it once every
# file is there: a folder that still has it is never loaded (its text: what to pull again).
INCOMPLETE_MARKER = ".gptj-pull-incomplete"


def resolve(name_or_path: str | None, revision: str | None = None) -> Path:
    """A GGUF file or a Hugging Face folder for a name, path or repo id."""
    if name_or_path in BUNDLED_NAMES:
        from gptj.tokenizer import bundled_gguf_path

        return bundled_gguf_path()
    path = Path(name_or_path).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").exists():
            return model_in_folder(path)  # a folder of GGUF files: the one to load
        return path
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/")):
        from gptj.loading.ggufpick import split_tag

        spec, tag = split_tag(name_or_path)  # owner/name[@rev][:QUANT], as llama.cpp's -hf
        repo, _, rev = spec.partition("@")
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(repo, revision=revision or rev or None, local_files_only=True,
                                            cache_dir=hf_cache_dir()))
        except Exception as exc:
            # `gptj pull` takes only the files a model needs; huggingface_hub calls such a
            # snapshot incomplete against the repo's full file listing, and names its folder.
            partial = getattr(exc, "snapshot_path", None)
            if partial and ((Path(partial) / "config.json").exists() or any(Path(partial).rglob("*.gguf"))):
                return model_in_folder(Path(partial), tag, name_or_path)
            raise ModelLoadError(
                f"model {name_or_path!r} is not in the local Hugging Face cache ({exc.__class__.__name__}); "
                f"download it with: gptj pull {repo}" + (f":{tag}" if tag else "")
                + (f" --revision {revision or rev}" if revision or rev else "")
            ) from None
        return model_in_folder(folder, tag, name_or_path)
    local = in_model_dirs(name_or_path)
    if local is not None:
        return local
    raise ModelLoadError(f"model {name_or_path!r} not found: not a file, a folder, a model in {models_dir()} "
                         "(`gptj models` lists them) or a repo id like EleutherAI/gpt-j-6b")


def model_dirs() -> list[Path]:
    """The models directories: GPTJ_MODELS (several joined by os.pathsep), else ~/.cache/gptj/models
    (under XDG_CACHE_HOME when set, beside the kernels). `gptj models` lists what is in them."""
    configured = os.environ.get("GPTJ_MODELS")
    if configured and any(configured.split(os.pathsep)):
        return [Path(p).expanduser() for p in configured.split(os.pathsep) if p]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [Path(cache) / "gptj" / "models"]


def models_dir() -> Path:
    """Where `gptj quantize` and `gptj make-random-checkpoint` write when given no output path."""
    return model_dirs()[0]


def in_model_dirs(name: str) -> Path | None:
    """A model folder or file the models directories hold under `name` (a bare name: no path)."""
    if not name or "/" in name or os.sep in name or name.startswith("."):
        return None
    for folder in model_dirs():
        for candidate in (folder / name, folder / f"{name}.gguf"):
            if candidate.exists():
                return model_in_folder(candidate) if candidate.is_dir() else candidate
    return None


def default_quantization(name_or_path: str | None) -> str | None:
    """The quantization `gptj.load` uses when none is given: int8 for the bundled model, else
    None (the weights as stored: a `gptj quantize` folder's own, a float checkpoint's dtype)."""
    return BUNDLED_QUANTIZATION if name_or_path in BUNDLED_NAMES else None


def model_in_folder(folder: Path, tag: str | None = None, source: str | None = None) -> Path:
    """What to load from a model folder (a snapshot): the folder itself when it is a Hugging Face
    one, else (or when a quantization `tag` is asked for) the GGUF file in it that
    gptj.loading.ggufpick.choose_gguf picks. A folder a `gptj pull` did not finish is refused."""
    if tag is None and (folder / "config.json").exists():
        return folder
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.gguf") if p.is_file())
    if not names and tag is None:
        return folder  # the loader says what is missing
    if (folder / INCOMPLETE_MARKER).exists():
        with (folder / INCOMPLETE_MARKER).open(errors="replace") as f:
            what = " ".join(f.read(300).split()) or "the model"
        raise ModelLoadError(f"{folder} is an incomplete download: gptj pull {what} did not finish; run it again")
    from gptj.loading.ggufpick import choose_gguf

    return folder / choose_gguf(names, tag, where=source or str(folder))


def model_name(name_or_path: str | None) -> str:
    """The model's name in the APIs (`/v1/models`, `model` in responses) and the banner: the
    bundled model's own name, a repo id as given, and for a folder or file on disk its own name
    (`/models/gpt-j-6b/` -> `gpt-j-6b`, `x/smol.Q8_0.gguf` -> `smol.Q8_0`), not its whole path
    (`ModelInfo.path` keeps that). `gptj serve --served-model-name` adds names."""
    if name_or_path in BUNDLED_NAMES:
        return "SmolLM2-135M-Instruct"
    path = Path(name_or_path).expanduser()
    if path.exists():
        path = path.resolve()
        return (path.stem if path.is_file() else path.name) or str(path)
    return name_or_path


def hf_cache_dir() -> str | None:
    """The hub cache as the environment says now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None
