"""`gptj quantize SRC DST`: a quantized checkpoint (safetensors + config.json) that loads by
memory map in seconds. The quantized layers keep their portable buffers (`qweight`, `scales`,
`mins` for int4, `bias`); config.json records the mode and int4 group size under
`quantization_config`. Folders written before int4 had `mins` hold uint8 `zeros` instead (in
groups of 128 or 64); QuantizedLinear.from_state converts those as they load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

QUANT_METHOD = "gptj-studio"
TOKENIZER_FILE = "gguf_tokenizer.json"  # a GGUF source's tokenizer metadata, kept beside the weights


def write_quantized(src: str, dst: str, bits: int) -> Path:
    from gptj.gguf import config_from_metadata, read_metadata
    from gptj.loading import load_model, resolve

    mode = {8: "int8", 4: "int4"}[bits]
    model, _, info = load_model(src, quantize=mode)
    out = Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    source = resolve(src)
    if info.format == "gguf":
        meta = read_metadata(source)
        config = config_from_metadata(meta)
        tokenizer_meta = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
        (out / TOKENIZER_FILE).write_text(json.dumps(tokenizer_meta, ensure_ascii=False))
    else:
        config = json.loads((source / "config.json").read_text())
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
            if (source / name).exists():
                shutil.copy(source / name, out / name)
    config["tie_word_embeddings"] = False  # lm_head is quantized on its own
    from gptj.quant import GROUP_SIZE

    config["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "mode": mode,
        "group_size": GROUP_SIZE if mode == "int4" else None,
    }
    config["torch_dtype"] = info.dtype
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    from safetensors.torch import save_file

    save_file(_untie(state), out / "model.safetensors", metadata={"format": "pt", "quantization": mode})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory; clone the later ones."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def install_quantized_layers(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Replaces each Linear whose `qweight` is in `state` by a QuantizedLinear over those
    tensors (no copy) and removes its tensors from `state`."""
    from gptj.quant import QuantizedLinear

    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and f"{name}.qweight" in state:
            prefix = f"{name}."
            layer = QuantizedLinear.from_state(state, prefix)
            if (layer.in_features, layer.out_features) != (module.in_features, module.out_features):
                from gptj.loading import ModelLoadError

                raise ModelLoadError(
                    f"quantized layer {name} is {layer.in_features}x{layer.out_features}, "
                    f"the config says {module.in_features}x{module.out_features}"
                )
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
            for key in [k for k in state if k.startswith(prefix) and k.count(".") == name.count(".") + 1]:
                del state[key]
