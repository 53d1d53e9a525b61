"""Which .gguf file of a repo or a downloaded snapshot is meant: by file name, by quantization
as llama.cpp's `-hf owner/name:Q4_K_M` picks it, or the only / the Q4_K_M one."""

from __future__ import annotations

import re

from gptj.errors import ModelLoadError

GGUF_DEFAULT_TAG = "Q4_K_M"  # what llama.cpp's `-hf owner/name` takes when no quant is named
_GGUF_SHARD = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)


def split_tag(repo_id: str) -> tuple[str, str | None]:
    """`owner/name:Q4_K_M@rev` or `owner/name@rev:Q4_K_M` -> (`owner/name@rev`, `Q4_K_M`)."""
    spec, sep, tag = repo_id.partition(":")
    if not sep:
        return repo_id, None
    tag, _, rev = tag.partition("@")
    if rev:
        spec = f"{spec}@{rev}"
    return spec, tag or None


def _quant_matches(name: str, tag: str) -> bool:
    """Whether a GGUF file name carries the quantization `tag` as a whole word (Q4_K is not Q4_K_M)."""
    base = name.rsplit("/", 1)[-1]
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(tag)}(?![A-Za-z0-9_])", base, re.IGNORECASE) is not None


def choose_gguf(names: list[str], tag: str | None = None, gguf: str | None = None, where: str = "the repo") -> str:
    """The one .gguf file to use among `names`: the one named `gguf` (its path, or its name when
    that is unique), the one whose name has the quantization `tag`, else the only one, else the
    Q4_K_M. Projector files (mmproj-*) and split GGUFs (-00001-of-00003) are never chosen."""
    ggufs = [n for n in names if n.lower().endswith(".gguf")]
    usable = [n for n in ggufs if not n.rsplit("/", 1)[-1].lower().startswith("mmproj") and not _GGUF_SHARD.search(n)]
    listed = ", ".join(sorted(usable)[:12]) + (" ..." if len(usable) > 12 else "") if usable else "none"
    if gguf is not None:
        matches = [n for n in ggufs if n == gguf] or [n for n in ggufs if n.rsplit("/", 1)[-1] == gguf]
        if len(matches) != 1:
            raise ModelLoadError(f"{where} has {'no' if not matches else 'several'} GGUF file {gguf!r} (GGUF files: {listed})")
        if _GGUF_SHARD.search(matches[0]):
            raise ModelLoadError(f"{matches[0]} is one part of a split GGUF; split GGUF files are not supported")
        return matches[0]
    if tag is not None:
        matches = [n for n in usable if _quant_matches(n, tag)]
        if len(matches) == 1:
            return matches[0]
        split = [n for n in ggufs if _GGUF_SHARD.search(n) and _quant_matches(n, tag)]
        if not matches and split:
            raise ModelLoadError(f"{where} has {tag} only as a split GGUF ({split[0]}, ...), which is not supported; "
                           f"GGUF files: {listed}")
        raise ModelLoadError(f"{where} has {'no' if not matches else 'several'} GGUF file for {tag!r}: GGUF files: "
                       f"{listed}; name one with --gguf FILE")
    if len(usable) == 1:
        return usable[0]
    default = [n for n in usable if _quant_matches(n, GGUF_DEFAULT_TAG)]
    if len(default) == 1:
        return default[0]
    if not usable:
        raise ModelLoadError(f"{where} has no GGUF file gptj can load (split GGUFs and projectors are not)")
    raise ModelLoadError(f"{where} has several GGUF files ({listed}); pick one as owner/name:QUANT "
                   "(e.g. :Q4_K_M, :Q8_0) or with --gguf FILE")
