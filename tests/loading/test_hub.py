"""`gptj pull` against a stand-in Hugging Face Hub served on loopback, then `gptj.load` offline.

The stand-in implements just the endpoints huggingface_hub calls:

* ``GET /api/models/{repo}[/revision/{rev}]``: model info with ``sha`` and ``siblings`` (sizes, LFS)
* ``GET /api/models/{repo}/tree/{rev}``: the recursive file listing (one page)
* ``HEAD|GET /{repo}/resolve/{rev}/{file}``: the bytes, with ``ETag``, ``X-Repo-Commit``,
  ``Content-Length``; a ``Range`` is answered with 206 and ``Content-Range``

and injects faults: ``drop_once`` (the first GET of a file stops 1 MB before the end and closes
the connection), ``fail_ranged`` (ranged GETs answer 503), ``huge`` (a petabyte in the listing).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch

import gptj
from gptj.loading.hub import TOKENIZER_FILES, HubError, NotEnoughDiskSpace, RepoFile, pull, select_files
from gptj.loading.random_checkpoint import make_random_checkpoint

REPO = "test-org/tiny-gptj"
LFS_MIN = 1024  # files at least this big are listed as LFS files, as on the Hub
IDS = [464, 3139, 286, 4881, 318, 6342, 13, 50256, 11]


class StandInHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, dict]] = {}  # repo -> revision -> {"sha", "files": {name: bytes}}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.drop_once: set[str] = set()
        self.fail_ranged: set[str] = set()
        self.huge: set[str] = set()
        self._dropped: set[str] = set()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, repo: str, revision: str, files: dict[str, bytes]) -> str:
        sha = hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
        self.repos.setdefault(repo, {})[revision] = {"sha": sha, "files": dict(files)}
        return sha

    def lookup(self, repo: str, rev: str) -> dict | None:
        revisions = self.repos.get(repo, {})
        if rev in revisions:
            return revisions[rev]
        return next((r for r in revisions.values() if r["sha"] == rev), None)

    def downloads(self, name: str) -> list[tuple[str, str | None]]:
        return [(m, rng) for m, p, rng in self.requests if m == "GET" and p.endswith("/" + name) and "/resolve/" in p]

    @staticmethod
    def oid(data: bytes) -> str:
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def entry(self, name: str, data: bytes, style: str) -> dict:
        size = 10**15 if name in self.huge else len(data)
        lfs = {"oid" if style == "tree" else "sha256": hashlib.sha256(data).hexdigest(), "size": size, "pointerSize": 134}
        extra = {"lfs": lfs} if size >= LFS_MIN else {}
        if style == "tree":
            return {"type": "file", "path": name, "size": size, "oid": self.oid(data), **extra}
        return {"rfilename": name, "size": size, "blobId": self.oid(data), **extra}

    @staticmethod
    def drop_at(data: bytes) -> int:
        # huggingface_hub writes whole 10 MB chunks: a drop past the first one leaves something to resume from
        return max(len(data) - 1_000_000, len(data) // 2)

    def etag(self, data: bytes) -> str:
        return hashlib.sha256(data).hexdigest() if len(data) >= LFS_MIN else self.oid(data)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # noqa: ANN002
                pass

            def do_HEAD(self) -> None:  # noqa: N802
                self.route(head=True)

            def do_GET(self) -> None:  # noqa: N802
                self.route(head=False)

            def send(self, status: int, body: bytes, headers: dict[str, str], head: bool = False) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def not_found(self, code: str, head: bool = False) -> None:
                self.send(404, json.dumps({"error": code}).encode(), {"Content-Type": "application/json", "X-Error-Code": code}, head)

            def route(self, head: bool) -> None:
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path, self.headers.get("Range")))
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path):
                    r = hub.lookup(m[1], m[2])
                    if r is None:
                        return self.not_found("RevisionNotFound" if m[1] in hub.repos else "RepoNotFound")
                    listing = [hub.entry(n, d, "tree") for n, d in r["files"].items()]
                    return self.send(200, json.dumps(listing).encode(), {"Content-Type": "application/json"})
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
                    if m[1] not in hub.repos:
                        return self.not_found("RepoNotFound")
                    r = hub.lookup(m[1], m[2] or "main")
                    if r is None:
                        return self.not_found("RevisionNotFound")
                    info = {"id": m[1], "modelId": m[1], "sha": r["sha"], "private": False,
                            "siblings": [hub.entry(n, d, "info") for n, d in r["files"].items()]}
                    return self.send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
                if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                    return self.resolve(m[1], m[2], m[3], head)
                return self.not_found("EntryNotFound", head)

            def resolve(self, repo: str, rev: str, name: str, head: bool) -> None:
                r = hub.lookup(repo, rev)
                if r is None or name not in r["files"]:
                    return self.not_found("EntryNotFound" if r else "RevisionNotFound", head)
                data = r["files"][name]
                headers = {"ETag": f'"{hub.etag(data)}"', "X-Repo-Commit": r["sha"], "Accept-Ranges": "bytes",
                           "Content-Type": "application/octet-stream"}
                rng = self.headers.get("Range")
                if head:
                    return self.send(200, data, headers, head=True)
                if rng:
                    if name in hub.fail_ranged:
                        return self.send(503, b'{"error": "the stand-in is down"}', {"Content-Type": "application/json"})
                    m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
                    start, end = int(m[1]), int(m[2]) if m[2] else len(data) - 1
                    headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                    return self.send(206, data[start : end + 1], headers)
                if name in hub.drop_once and name not in hub._dropped:
                    hub._dropped.add(name)
                    self.send_response(200)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: hub.drop_at(data)])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return None
                return self.send(200, data, headers)

        return Handler


def folder_files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("checkpoints")
    return {
        "bin": make_random_checkpoint(base / "bin", "tiny", "bin", seed=0),
        "safetensors": make_random_checkpoint(base / "safetensors", "tiny", "safetensors", seed=1),
    }


@pytest.fixture()
def hub(checkpoints: dict[str, Path]) -> Iterator[StandInHub]:
    h = StandInHub()
    # main: both layouts (different weights, so the logits tell which one was loaded) and files
    # a model does not need; float16: only pytorch_model.bin, as EleutherAI/gpt-j-6b's.
    h.add(REPO, "main", {**folder_files(checkpoints["bin"]), **folder_files(checkpoints["safetensors"]),
                         "README.md": b"# tiny\n", "tf_model.h5": b"\0" * 4096, ".gitattributes": b"*.bin filter=lfs\n"})
    h.add(REPO, "float16", folder_files(checkpoints["bin"]))
    h.thread.start()
    yield h
    h.server.shutdown()
    h.server.server_close()


def subprocess_env(hub: StandInHub, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING")) and "proxy" not in k.lower()}
    env.update({"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf-home"),
                "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1", "NO_PROXY": "127.0.0.1,localhost", **extra})
    return env


def gptj_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptj.cli", *args], env=env, capture_output=True, text=True, timeout=120)


def reference_logits(folder: Path) -> torch.Tensor:
    return gptj.load(str(folder), dtype=torch.float32).logits(IDS)


def test_pull_then_load_offline_gives_the_same_logits(hub: StandInHub, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    env = subprocess_env(hub, tmp_path)
    main = gptj_cli(["pull", REPO], env)
    assert main.returncode == 0, main.stderr
    folder = Path(main.stdout.strip())  # stdout: just the folder; the plan and progress go to stderr
    tokenizer_files = sorted(p.name for p in checkpoints["bin"].iterdir() if p.name in TOKENIZER_FILES)
    assert "merges.txt" in tokenizer_files and "vocab.json" in tokenizer_files
    assert f"pulling test-org/tiny-gptj (safetensors, {2 + len(tokenizer_files)} files" in main.stderr
    assert folder.is_relative_to(tmp_path / "hub") and folder.name == hub.repos[REPO]["main"]["sha"]
    # config, tokenizer, one weight layout (safetensors over the .bin), and nothing a model does not need
    assert sorted(p.name for p in folder.iterdir()) == sorted(["config.json", "model.safetensors", *tokenizer_files])
    assert not hub.downloads("pytorch_model.bin") and not hub.downloads("README.md")

    f16 = gptj_cli(["pull", REPO, "--revision", "float16"], env)
    assert f16.returncode == 0, f16.stderr
    f16_files = sorted(p.name for p in Path(f16.stdout.strip()).iterdir())
    assert f16_files == sorted(["config.json", "pytorch_model.bin", *tokenizer_files])

    script = (
        "import sys, torch, gptj\n"
        f"ids = {IDS}\n"
        "out = {\n"
        f"  'main': gptj.load({REPO!r}, dtype=torch.float32).logits(ids),\n"
        f"  'at': gptj.load({REPO + '@float16'!r}, dtype=torch.float32).logits(ids),\n"
        f"  'kw': gptj.load({REPO!r}, revision='float16', dtype=torch.float32).logits(ids),\n"
        "}\n"
        "torch.save(out, sys.argv[1])\n"
    )
    offline = subprocess_env(hub, tmp_path, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens there
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "logits.pt")], env=offline,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    got = torch.load(tmp_path / "logits.pt")
    assert torch.equal(got["main"], reference_logits(checkpoints["safetensors"]))
    expected_bin = reference_logits(checkpoints["bin"])
    assert torch.equal(got["at"], expected_bin) and torch.equal(got["kw"], expected_bin)


def test_pull_refuses_when_the_disk_is_too_small(hub: StandInHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    free = 5_000_000
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**12, 10**12 - free, free))
    with pytest.raises(NotEnoughDiskSpace) as err:
        pull(REPO, progress=False, endpoint=hub.url, token=False)
    wanted = ("config.json", "model.safetensors", *TOKENIZER_FILES)
    need = sum(len(d) for n, d in hub.repos[REPO]["main"]["files"].items() if n in wanted)
    assert f"({need} bytes)" in str(err.value) and f"({free} bytes)" in str(err.value)
    assert not [r for r in hub.requests if "/resolve/" in r[1]]  # refused before any download
    assert not (tmp_path / "hub").exists() or not any((tmp_path / "hub").rglob("*.safetensors"))


def test_cli_refuses_a_download_bigger_than_the_disk(hub: StandInHub, tmp_path: Path) -> None:
    hub.huge.add("pytorch_model.bin")  # the listing says a petabyte
    done = gptj_cli(["pull", REPO, "--revision", "float16"], subprocess_env(hub, tmp_path))
    assert done.returncode == 2
    assert "not enough disk space" in done.stderr and "1000000.00 GB" in done.stderr and "free in" in done.stderr
    assert not hub.downloads("pytorch_model.bin")


def test_a_dropped_connection_resumes_with_a_range_request(hub: StandInHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    hub.drop_once.add("model.safetensors")
    folder = pull(REPO, progress=False, endpoint=hub.url, token=False)
    data = hub.repos[REPO]["main"]["files"]["model.safetensors"]
    assert (folder / "model.safetensors").read_bytes() == data
    (first, _), (second, ranged) = hub.downloads("model.safetensors")
    assert first == second == "GET" and ranged is not None
    start = int(re.fullmatch(r"bytes=(\d+)-", ranged)[1])
    assert 0 < start <= hub.drop_at(data)  # only the missing tail came again


def test_an_interrupted_pull_completes_on_the_next_one(hub: StandInHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    hub.drop_once.add("model.safetensors")
    hub.fail_ranged.add("model.safetensors")  # the resume fails too: this pull gives up
    with pytest.raises(HubError, match="run gptj pull again"):
        pull(REPO, progress=False, endpoint=hub.url, token=False)
    hub.fail_ranged.clear()
    folder = pull(REPO, progress=False, endpoint=hub.url, token=False)
    data = hub.repos[REPO]["main"]["files"]["model.safetensors"]
    assert (folder / "model.safetensors").read_bytes() == data
    assert not list((tmp_path / "hub").rglob("*.incomplete"))
    assert len(hub.downloads("config.json")) == 1  # the file finished by the first pull was kept


def test_errors_name_the_problem(hub: StandInHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(HubError, match="repository not found"):
        pull("test-org/nope", progress=False, endpoint=hub.url, token=False)
    with pytest.raises(HubError, match="no such revision"):
        pull(REPO + "@nope", progress=False, endpoint=hub.url, token=False)
    with pytest.raises(HubError, match="not a Hugging Face repo id"):
        pull("just-a-name", progress=False, endpoint=hub.url, token=False)


def test_select_files_prefers_safetensors_and_keeps_shards_together() -> None:
    names = ["config.json", "tokenizer.json", "README.md", "pytorch_model.bin", "model.safetensors.index.json",
             "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "flax_model.msgpack"]
    chosen, layout = select_files([RepoFile(n, 1) for n in names])
    assert layout == "sharded safetensors"
    assert [f.name for f in chosen] == ["config.json", "tokenizer.json", "model.safetensors.index.json",
                                        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    chosen, layout = select_files([RepoFile(n, 1) for n in ("config.json", "pytorch_model.bin", "vocab.json", "merges.txt")])
    assert layout == "pytorch_model.bin" and [f.name for f in chosen] == ["config.json", "vocab.json", "merges.txt", "pytorch_model.bin"]
    with pytest.raises(HubError, match="no weights"):
        select_files([RepoFile("config.json", 1), RepoFile("tf_model.h5", 1)])
    # no Hugging Face weights but a GGUF: the GGUF (tests/loading/test_hub_gguf.py)
    assert select_files([RepoFile("config.json", 1), RepoFile("model.gguf", 1)]) == ([RepoFile("model.gguf", 1)],
                                                                                     "GGUF model.gguf")
