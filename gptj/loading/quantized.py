"""`gptj quantize SRC DST`: a quantized checkpoint (safetensors + config.json) that loads by
memory map in seconds. The quantized layers keep their portable buffers (`qweight`, `scales`,
`mins` for int4, `bias`); config.json records the mode and int4 group size under
`quantization_config`. Folders written before int4 had `mins` hold uint8 `zeros` instead (in
groups of 128 or 64); QuantizedLinear.from_state converts those as they load.

DST is never half-written: everything goes to `.DST.partial-<random>` beside it (config.json
last, so that folder never loads) and is renamed into place at the end."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from gptj.loading import ModelInfo

QUANT_METHOD = "gptj-studio"
TOKENIZER_FILE = "gguf_tokenizer.json"  # a GGUF source's tokenizer metadata, kept beside the weights
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")
WRITTEN_FILES = frozenset({"config.json", "model.safetensors", TOKENIZER_FILE, *COPIED_FILES})


def write_quantized(src: str, dst: str, bits: int) -> Path:
    from gptj.loading import load_model, resolve

    mode = {8: "int8", 4: "int4"}[bits]
    out = Path(dst)
    _check_replaceable(out)  # before the long load
    model, _, info = load_model(src, quantize=mode)
    source = resolve(src)
    parent, name = out.absolute().parent, out.absolute().name
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{name}.partial-{secrets.token_hex(4)}"
    tmp.mkdir()  # not tempfile.mkdtemp: its 0700 mode would become DST's
    try:
        _write(tmp, model, info, source, mode)
        _replace_folder(tmp, out)
    except BaseException:  # an error or Ctrl-C: nothing partial stays (a kill leaves tmp, without config.json)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_replaceable(out: Path) -> None:
    """Only a folder of the files write_quantized writes is replaced; anything else is refused
    rather than deleted (`gptj quantize model ~` must not remove a home folder)."""
    from gptj.errors import ModelLoadError

    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise ModelLoadError(f"{out} exists and is not a folder; choose another destination")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in WRITTEN_FILES or not p.is_file())
    if foreign:
        listed = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise ModelLoadError(f"{out} exists and holds files gptj quantize does not write ({listed}); "
                             "remove them or choose another destination")


def _replace_folder(new: Path, dst: Path) -> None:
    """Renames `new` to `dst`. An old `dst` is renamed aside first and deleted last, so that at
    every moment `dst` is either the old folder, absent, or the new one, never a mix."""
    old = None
    if dst.exists() or dst.is_symlink():
        old = dst.absolute().parent / f".{dst.absolute().name}.old-{secrets.token_hex(4)}"
        dst.rename(old)
    try:
        new.rename(dst)
    except BaseException:
        if old is not None:
            old.rename(dst)
        raise
    if old is not None:
        if old.is_symlink():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)


def _write(out: Path, model: nn.Module, info: ModelInfo, source: Path, mode: str) -> None:
    """The quantized folder's files, config.json last."""
    if info.format == "gguf":
        from gptj.loading.gguf import config_from_metadata, read_metadata

        meta = read_metadata(source)
        config = config_from_metadata(meta)
        tokenizer_meta = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
        (out / TOKENIZER_FILE).write_text(json.dumps(tokenizer_meta, ensure_ascii=False))
    elif info.format == "ggml":  # a legacy GGML GPT-J file: its header's config; its vocab unless GPT-J's
        from gptj.loading.ggml import open_ggml
        from gptj.tokenizer import ggml_vocab_metadata, is_gptj_vocab

        gm = open_ggml(source)
        config = dict(gm.config)
        if not is_gptj_vocab(gm.pieces):
            (out / TOKENIZER_FILE).write_text(json.dumps(ggml_vocab_metadata(gm.pieces), ensure_ascii=False))
    else:
        config = json.loads((source / "config.json").read_text())
        for name in COPIED_FILES:
            if (source / name).exists():
                shutil.copy(source / name, out / name)
    config["tie_word_embeddings"] = False  # lm_head is quantized on its own
    from gptj.quant import GROUP_SIZE, to_portable_layout

    config["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "mode": mode,
        "group_size": GROUP_SIZE if mode == "int4" else None,
    }
    config["torch_dtype"] = info.dtype
    to_portable_layout(model)  # the model is dropped after this: no need for its panels
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    from safetensors.torch import save_file

    save_file(_untie(state), out / "model.safetensors", metadata={"format": "pt", "quantization": mode})
    # safetensors writes 0600 (a temporary file renamed); the folder's other files follow the umask
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out / "model.safetensors", 0o666 & ~umask)
    (out / "config.json").write_text(json.dumps(config, indent=2))


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory; clone the later ones."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out
