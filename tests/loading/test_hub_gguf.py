"""`gptj pull` of GGUF-only repos against the stand-in Hub of test_hub.py: one .gguf comes down,
chosen by quantization as llama.cpp's `-hf owner/name:Q4_K_M` takes it, by `--gguf FILE`, or as
the repo's only / Q4_K_M file; `gptj.load("owner/name:Q8_0")` then finds it offline."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf_files import MIXES, random_llama, write_llama_gguf
from test_hub import StandInHub, gptj_cli, subprocess_env

import gptj
from gptj.errors import ModelLoadError
from gptj.loading.hub import HubError, RepoFile, pull, select_files

REPO = "test-org/tiny-llama-GGUF"
IDS = [5, 17, 300, 42, 511]


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("ggufs")
    ref = random_llama(seed=7)
    files = {"tiny.Q4_K_M.gguf": MIXES["Q4_K_M"], "tiny.Q8_0.gguf": lambda part, layer: T.Q8_0}
    out = {}
    for name, mix in files.items():
        write_llama_gguf(base / name, ref, mix)
        out[name] = base / name
    return out


@pytest.fixture()
def hub(ggufs: dict[str, Path]) -> Iterator[StandInHub]:
    h = StandInHub()
    files = {name: p.read_bytes() for name, p in ggufs.items()}
    files |= {"mmproj-tiny-f16.gguf": b"GGUF" + bytes(2000), "tiny.Q6_K-00001-of-00002.gguf": b"GGUF" + bytes(2000),
              "tiny.Q6_K-00002-of-00002.gguf": b"GGUF" + bytes(2000), "README.md": b"# tiny GGUFs\n"}
    h.add(REPO, "main", files)
    h.add("test-org/one-gguf", "main", {"model-q8_0.gguf": files["tiny.Q8_0.gguf"], "README.md": b"x"})
    h.thread.start()
    yield h
    h.server.shutdown()
    h.server.server_close()


def script_logits(name: str, out: Path) -> str:
    return (f"import torch, gptj\ntorch.save(gptj.load({name!r}, dtype=torch.float32).logits({IDS}), {str(out)!r})\n")


def test_pull_by_quant_tag_then_load_offline(hub: StandInHub, ggufs: dict[str, Path], tmp_path: Path) -> None:
    env = subprocess_env(hub, tmp_path)
    done = gptj_cli(["pull", f"{REPO}:Q8_0"], env)
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip())
    assert path.name == "tiny.Q8_0.gguf" and path.read_bytes() == ggufs["tiny.Q8_0.gguf"].read_bytes()
    assert "GGUF tiny.Q8_0.gguf, 1 files" in done.stderr
    assert [n for n in ("tiny.Q4_K_M.gguf", "mmproj-tiny-f16.gguf", "README.md") if hub.downloads(n)] == []
    offline = subprocess_env(hub, tmp_path, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    ran = subprocess.run([sys.executable, "-c", script_logits(f"{REPO}:Q8_0", tmp_path / "a.pt")], env=offline,
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    expected = gptj.load(str(ggufs["tiny.Q8_0.gguf"]), dtype=torch.float32).logits(IDS)
    assert torch.equal(torch.load(tmp_path / "a.pt"), expected)
    # the tag not pulled yet: a clear error that says what to run
    ran = subprocess.run([sys.executable, "-c", script_logits(f"{REPO}:Q4_K_M", tmp_path / "b.pt")], env=offline,
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode != 0 and "no GGUF file for 'Q4_K_M'" in ran.stderr


def test_pull_without_a_tag_takes_q4_k_m_and_gguf_names_a_file(hub: StandInHub, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    path = pull(REPO, progress=False, endpoint=hub.url, token=False)
    assert path.name == "tiny.Q4_K_M.gguf"
    path = pull(REPO, progress=False, endpoint=hub.url, token=False, gguf="tiny.Q8_0.gguf")
    assert path.name == "tiny.Q8_0.gguf"
    single = pull("test-org/one-gguf", progress=False, endpoint=hub.url, token=False)
    assert single.name == "model-q8_0.gguf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert gptj.load("test-org/one-gguf").info.format == "gguf"  # a folder of one GGUF: that one
    assert gptj.load(REPO).info.path.endswith("tiny.Q4_K_M.gguf")  # two pulled, no tag: Q4_K_M, as llama.cpp


def test_pull_errors_name_the_choices(hub: StandInHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(HubError, match=r"no GGUF file for 'Q5_K_M': GGUF files: tiny\.Q4_K_M\.gguf, tiny\.Q8_0\.gguf"):
        pull(f"{REPO}:Q5_K_M", progress=False, endpoint=hub.url, token=False)
    with pytest.raises(HubError, match="only as a split GGUF"):
        pull(f"{REPO}:Q6_K", progress=False, endpoint=hub.url, token=False)
    with pytest.raises(HubError, match="no GGUF file 'nope.gguf'"):
        pull(REPO, progress=False, endpoint=hub.url, token=False, gguf="nope.gguf")
    done = gptj_cli(["pull", f"{REPO}:Q5_K_M"], subprocess_env(hub, tmp_path))
    assert done.returncode == 2 and done.stderr.startswith("gptj: error: ") and "Traceback" not in done.stderr
    assert not [r for r in hub.requests if "/resolve/" in r[1]]  # nothing downloaded


def test_choose_gguf() -> None:
    from gptj.loading.ggufpick import choose_gguf

    names = ["a/m.Q4_K_S.gguf", "a/m.Q4_K_M.gguf", "a/m.Q4_K.gguf", "m.q8_0.gguf", "mmproj-m-f16.gguf",
             "m.F16-00001-of-00002.gguf"]
    assert choose_gguf(names, "Q4_K") == "a/m.Q4_K.gguf"  # not Q4_K_M or Q4_K_S
    assert choose_gguf(names, "q4_k_m") == "a/m.Q4_K_M.gguf"
    assert choose_gguf(names, "Q8_0") == "m.q8_0.gguf"
    assert choose_gguf(names) == "a/m.Q4_K_M.gguf"
    assert choose_gguf(names, gguf="m.Q4_K_S.gguf") == "a/m.Q4_K_S.gguf"
    with pytest.raises(ModelLoadError, match="split GGUF"):
        choose_gguf(names, gguf="m.F16-00001-of-00002.gguf")
    with pytest.raises(ModelLoadError, match="several GGUF files"):
        choose_gguf(["x.Q8_0.gguf", "x.Q5_0.gguf"])
    # a repo with Hugging Face weights stays a Hugging Face pull unless a GGUF is asked for
    files = [RepoFile(n, 1) for n in ("config.json", "model.safetensors", "model.Q8_0.gguf")]
    assert select_files(files)[1] == "safetensors"
    assert select_files(files, tag="Q8_0") == ([RepoFile("model.Q8_0.gguf", 1)], "GGUF model.Q8_0.gguf")
