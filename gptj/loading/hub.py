"""`gptj pull`: download a model from the Hugging Face Hub into the standard HF cache.

Only what a model needs comes down: config.json, the tokenizer files and ONE weight layout
(safetensors, sharded or not, before pytorch_model.bin; EleutherAI/gpt-j-6b's `float16`
revision has only the .bin). From a repo of GGUF files (no config.json, or asked for) ONE .gguf
comes down: named with `--gguf FILE`, or by its quantization as llama.cpp's `-hf` takes it
(`owner/name:Q4_K_M`), or the repo's only one, or its Q4_K_M (llama.cpp's default); then
`gptj.load("owner/name:Q4_K_M")` finds it offline. The free disk space is checked first, against the sizes in the
repo's file listing. Afterwards `gptj.load("owner/name")` (or `"owner/name@revision"`) finds
the files offline: the cache is the one `gptj.loading.resolve()` reads (HF_HUB_CACHE /
HF_HOME, read when called).

Downloads go through `huggingface_hub.snapshot_download`: one progress bar, files already in
the cache are skipped, and a connection that drops mid-file is resumed with a Range request.
A file interrupted for good (Ctrl-C) is fetched again from its start by the next `pull`.

A pull that did not finish never leaves a folder that loads as a whole model: before
downloading, a marker (gptj.loading.INCOMPLETE_MARKER) goes into the snapshot folder, and only a
pull that has every file removes it; `gptj.load` refuses a folder that has it.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from gptj.errors import ModelLoadError
from gptj.loading.ggufpick import choose_gguf, split_tag
from gptj.loading.resolve import INCOMPLETE_MARKER, hf_cache_dir

GB = 1e9
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "gguf_tokenizer.json",  # beside a `gptj quantize` checkpoint
)
_SHARD = re.compile(r"^(?P<base>model|pytorch_model)-\d+-of-\d+\.(?P<ext>safetensors|bin)$")
# Preference order: one of these layouts is downloaded, the first the repo has.
LAYOUTS = (
    ("sharded safetensors", "model.safetensors.index.json", "model", "safetensors"),
    ("safetensors", "model.safetensors", None, None),
    ("sharded pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model", "bin"),
    ("pytorch_model.bin", "pytorch_model.bin", None, None),
)


class HubError(ModelLoadError):
    """A download that cannot start or did not finish (the CLI prints it as `gptj: error: ...`)."""


class NotEnoughDiskSpace(HubError, OSError):
    pass


@dataclass
class RepoFile:
    name: str
    size: int


def split_repo(repo_id: str, revision: str | None) -> tuple[str, str | None]:
    """`owner/name@rev` -> (`owner/name`, rev); an explicit revision wins."""
    repo, _, rev = repo_id.partition("@")
    if repo.count("/") != 1 or repo.startswith(("/", ".")) or repo.endswith("/"):
        raise HubError(f"{repo_id!r} is not a Hugging Face repo id like EleutherAI/gpt-j-6b")
    return repo, revision or rev or None


def select_files(files: list[RepoFile], *, gguf: str | None = None, tag: str | None = None,
                 ) -> tuple[list[RepoFile], str]:
    """The files a model needs: config, tokenizer and the preferred weight layout; or one GGUF
    file (when asked for by `gguf` / `tag`, or when the repo has GGUF files and no HF weights)."""
    by_name = {f.name: f for f in files if "/" not in f.name}
    has_ggufs = any(f.name.lower().endswith(".gguf") for f in files)
    has_hf_weights = "config.json" in by_name and any(layout[1] in by_name for layout in LAYOUTS)
    if gguf is not None or tag is not None or (has_ggufs and not has_hf_weights):
        try:
            name = choose_gguf([f.name for f in files], tag, gguf)
        except ModelLoadError as exc:
            raise HubError(str(exc)) from None
        chosen = next(f for f in files if f.name == name)
        return [chosen], f"GGUF {name}"
    if "config.json" not in by_name:
        listed = ", ".join(sorted(by_name)[:12]) or "no files"
        raise HubError(f"the repo has no config.json at its root (it has {listed}); not a model gptj can load")
    chosen = [by_name[n] for n in (*CONFIG_FILES, *TOKENIZER_FILES) if n in by_name]
    for label, marker, shard_base, shard_ext in LAYOUTS:
        if marker not in by_name:
            continue
        weights = [by_name[marker]]
        if shard_base:
            shards = [f for n, f in sorted(by_name.items())
                      if (m := _SHARD.match(n)) and m["base"] == shard_base and m["ext"] == shard_ext]
            if not shards:
                continue  # an index without shards: try the next layout
            weights += shards
        return chosen + weights, label
    raise HubError(
        "the repo has no weights gptj can load: looked for model.safetensors(.index.json) and "
        "pytorch_model.bin(.index.json) at its root"
    )


def cache_dir() -> Path:
    """The hub cache `gptj.load` reads: HF_HUB_CACHE, HF_HOME/hub, or huggingface_hub's default."""
    configured = hf_cache_dir()
    if configured:
        return Path(configured).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _snapshot(cache: Path, repo: str, sha: str) -> Path:
    """The folder huggingface_hub keeps the files of `repo` at commit `sha` in."""
    return cache / ("models--" + repo.replace("/", "--")) / "snapshots" / sha


def _cached(cache: Path, repo: str, sha: str, name: str) -> bool:
    return (_snapshot(cache, repo, sha) / name).exists()


def check_disk_space(needed: int, cache: Path) -> None:
    free = shutil.disk_usage(_existing_parent(cache)).free
    if needed > free:
        raise NotEnoughDiskSpace(
            f"not enough disk space: the download needs {needed / GB:.2f} GB ({needed} bytes) but only "
            f"{free / GB:.2f} GB ({free} bytes) is free in {cache}; free some space or point HF_HUB_CACHE "
            "at a bigger disk"
        )


def plan(repo_id: str, revision: str | None = None, *, endpoint: str | None = None,
         token: str | bool | None = None, gguf: str | None = None) -> tuple[str, str, list[RepoFile], str]:
    """(repo, commit sha, files to download, layout) from the repo's file listing."""
    from huggingface_hub import HfApi

    spec, tag = split_tag(repo_id)
    repo, rev = split_repo(spec, revision)
    api = HfApi(endpoint=endpoint, token=token)
    try:
        info = api.model_info(repo, revision=rev, files_metadata=True)
    except Exception as exc:
        raise _hub_error(exc, repo, rev) from None
    files = [RepoFile(s.rfilename, _size(s)) for s in info.siblings or []]
    chosen, layout = select_files(files, gguf=gguf, tag=tag)
    return repo, info.sha or "", chosen, layout


def _size(sibling) -> int:  # noqa: ANN001
    if sibling.lfs is not None and sibling.lfs.size is not None:
        return int(sibling.lfs.size)
    return int(sibling.size or 0)


def pull(repo_id: str, revision: str | None = None, progress: bool = True, *, endpoint: str | None = None,
         token: str | bool | None = None, gguf: str | None = None) -> Path:
    """Downloads a model repo (`EleutherAI/gpt-j-6b`, or `...@float16`) into the HF cache and
    returns its snapshot folder; for a GGUF (`owner/name:Q4_K_M`, `gguf="file.gguf"`, or a repo
    of GGUF files) the path of the .gguf file. Refuses before downloading anything when the disk
    is too small. `endpoint` overrides HF_ENDPOINT (a mirror); `token` overrides HF_TOKEN /
    `hf auth login`."""
    from huggingface_hub import snapshot_download

    spec, tag = split_tag(repo_id)
    repo, rev = split_repo(spec, revision)
    _, sha, files, layout = plan(repo + (f":{tag}" if tag else ""), rev, endpoint=endpoint, token=token, gguf=gguf)
    cache = cache_dir()
    missing = [f for f in files if not (sha and _cached(cache, repo, sha, f.name))]
    check_disk_space(sum(f.size for f in missing), cache)
    total = sum(f.size for f in files)
    if progress:
        print(f"gptj: pulling {repo}{'@' + rev if rev else ''} ({layout}, {len(files)} files, "
              f"{total / GB:.2f} GB) into {cache}", file=sys.stderr, flush=True)
    planned = _snapshot(cache, repo, sha) if sha and missing else None
    if planned:  # removed below once every file is there; a pull killed before leaves it
        planned.mkdir(parents=True, exist_ok=True)
        again = repo + (f":{tag}" if tag else "") + (f" --gguf {gguf}" if gguf else "")
        (planned / INCOMPLETE_MARKER).write_text(again + (f" --revision {rev}" if rev else "") + "\n")
    restore = _progress_bars(progress)
    try:
        folder = snapshot_download(
            repo,
            revision=rev,
            cache_dir=str(cache),
            allow_patterns=[f.name for f in files],
            endpoint=endpoint,
            token=token,
        )
    except Exception as exc:
        raise _hub_error(exc, repo, rev) from None
    finally:
        restore()
    folder_path = Path(folder)
    absent = [f.name for f in files if not (folder_path / f.name).exists()]
    if absent:
        raise HubError(f"the download of {repo} did not complete: missing {', '.join(absent)}; run gptj pull again")
    for marked in (folder_path, planned):  # the same folder unless the revision moved meanwhile
        if marked is not None:
            (marked / INCOMPLETE_MARKER).unlink(missing_ok=True)
    if layout.startswith("GGUF "):
        return folder_path / files[0].name
    return folder_path



def _progress_bars(enabled: bool):  # noqa: ANN202
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if enabled and not was_disabled:
        return lambda: None
    if enabled:
        enable_progress_bars()
        return disable_progress_bars
    disable_progress_bars()
    return (lambda: None) if was_disabled else enable_progress_bars


def _hub_error(exc: Exception, repo: str, rev: str | None) -> HubError:
    if isinstance(exc, HubError):
        return exc
    from huggingface_hub import errors

    where = f"{repo}" + (f" (revision {rev})" if rev else "")
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, errors.RevisionNotFoundError):
        return HubError(f"{where}: no such revision on the Hub ({first_line})")
    if isinstance(exc, errors.GatedRepoError):
        return HubError(f"{where} is gated: accept its terms on the Hub and log in (hf auth login or HF_TOKEN)")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return HubError(f"{where}: repository not found on the Hub (or private: log in with hf auth login or HF_TOKEN)")
    if isinstance(exc, errors.OfflineModeIsEnabled) or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return HubError(f"cannot download {where}: HF_HUB_OFFLINE is set")
    if isinstance(exc, OSError) and "space" in str(exc).lower():
        return NotEnoughDiskSpace(f"downloading {where} failed: {first_line}")
    return HubError(f"downloading {where} failed ({type(exc).__name__}: {first_line}); "
                    "run gptj pull again to retry (files already complete are kept)")
