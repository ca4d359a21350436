"""`numpy-gpt2 download`: the real huggingface_hub client, end to end, against a local hub.

The fake hub answers the requests huggingface_hub's file download makes, the way huggingface.co
does (huggingface_hub/file_download.py: `get_hf_file_metadata`, then `http_get`):
- HEAD/GET /{repo}/resolve/{revision}/{file}: a small file comes back directly with its git blob
  sha1 as ETag; an LFS file (*.safetensors) is a 302 to a second server, the CDN, carrying
  X-Linked-Etag (the sha256 of the content) and X-Linked-Size; both carry X-Repo-Commit. A
  missing repo, revision or file is a 404 with X-Error-Code RepoNotFound, RevisionNotFound or
  EntryNotFound.
- GET on the CDN: the bytes; from an offset, with 206, for a Range request.
HF_ENDPOINT points at it and HTTPS_PROXY at a closed port, so a misconfigured test fails instead
of reaching huggingface.co; each test also checks that the fake hub saw its requests.

References trusted: the served bytes and hashlib (for checksums), transformers' logits for the
tiny reference checkpoint, and huggingface_hub's own `get_local_download_paths` for where a
partial download lives.
"""

import dataclasses
import hashlib
import http.server
import os
import pathlib
import re
import socket
import subprocess
import sys
import threading
import urllib.parse

import numpy as np
import pytest

from conftest import tolerance
from numpy_gpt2 import GPT2
from numpy_gpt2.download import download
from numpy_gpt2.errors import CheckpointError, GPT2Error, ModelNotFoundError
from numpy_gpt2.weights.resolve import resolve_model

hf_constants = pytest.importorskip("huggingface_hub.constants")

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / "numpy_gpt2" / "data"
REPO = "user/tiny-gpt2"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_test_token_not_a_real_one"
TIMEOUT = 60


@dataclasses.dataclass
class Request:
    role: str  # "hub" or "cdn"
    method: str
    path: str
    headers: dict  # lower-case names


@dataclasses.dataclass
class FakeHub:
    repos: dict  # repo id -> {filename: bytes}
    endpoint: str = ""
    cdn: str = ""
    corrupt: set = dataclasses.field(default_factory=set)  # sha256s served with one byte flipped
    requests: list = dataclasses.field(default_factory=list)

    def served(self, sha: str) -> bytes:
        data = next(d for files in self.repos.values() for d in files.values() if _sha256(d) == sha)
        if sha in self.corrupt:
            data = bytearray(data)
            data[len(data) // 2] ^= 0xFF
            data = bytes(data)
        return data


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._answer(send_body=False)

    def do_GET(self):
        self._answer(send_body=True)

    def _answer(self, send_body):
        hub, role = self.server.hub, self.server.role
        hub.requests.append(Request(role, self.command, self.path,
                                    {k.lower(): v for k, v in self.headers.items()}))
        if role == "cdn":
            self._cdn(hub, send_body)
            return
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", urllib.parse.unquote(self.path))
        repo, revision, filename = match.groups() if match else (None, None, None)
        if repo not in hub.repos:
            self._send(404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, b"", send_body)
        elif revision not in ("main", COMMIT):
            self._send(404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}, b"", send_body)
        elif filename not in hub.repos[repo]:
            self._send(404, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found",
                             "X-Repo-Commit": COMMIT}, b"", send_body)
        elif filename.endswith(".safetensors"):
            data = hub.repos[repo][filename]
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{_sha256(data)}\nsize {len(data)}\n"
            self._send(302, {"Location": f"{hub.cdn}/blobs/{_sha256(data)}?signature=x",
                             "ETag": f'"{_git_sha1(pointer.encode())}"', "X-Linked-Etag": f'"{_sha256(data)}"',
                             "X-Linked-Size": str(len(data)), "X-Repo-Commit": COMMIT}, b"", send_body)
        else:
            data = hub.repos[repo][filename]
            self._send(200, {"ETag": f'"{_git_sha1(data)}"', "X-Repo-Commit": COMMIT}, data, send_body)

    def _cdn(self, hub, send_body):
        data = hub.served(self.path.split("?")[0].rsplit("/", 1)[-1])
        start = int(re.fullmatch(r"bytes=(\d+)-", self.headers["Range"]).group(1)) if "Range" in self.headers else 0
        headers = {"Accept-Ranges": "bytes"}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self._send(206 if start else 200, headers, data[start:], send_body)

    def _send(self, status, headers, body, send_body):
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)


@pytest.fixture(scope="module")
def repo_files(tiny_ref):
    """The files of the served repo: the tiny reference checkpoint and GPT-2's tokenizer files."""
    return {
        "config.json": (tiny_ref.hub_dir / "config.json").read_bytes(),
        "model.safetensors": (tiny_ref.hub_dir / "model.safetensors").read_bytes(),
        "vocab.json": (DATA / "encoder.json").read_bytes(),
        "merges.txt": (DATA / "vocab.bpe").read_bytes(),
        "generation_config.json": b'{"_from_model_config": true}\n',
    }


@pytest.fixture
def hub(repo_files, tmp_path, monkeypatch):
    """A fake hub and CDN on two local ports, with huggingface_hub pointed at the hub."""
    state = FakeHub(repos={REPO: repo_files, "openai-community/gpt2": repo_files,
                           "user/config-only": {"config.json": repo_files["config.json"]}})
    servers = []
    for role in ("hub", "cdn"):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.hub, server.role, server.daemon_threads = state, role, True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        servers.append(server)
    state.endpoint, state.cdn = (f"http://127.0.0.1:{s.server_address[1]}" for s in servers)

    # huggingface_hub reads these at import; the environment is for the subprocesses.
    home = tmp_path / "hf-home"
    monkeypatch.setattr(hf_constants, "ENDPOINT", state.endpoint)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        state.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    for key, value in {"HF_ENDPOINT": state.endpoint, "HF_HOME": str(home), "HF_HUB_OFFLINE": "0",
                       "TRANSFORMERS_OFFLINE": "0", "HTTPS_PROXY": "http://127.0.0.1:9",
                       "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONIOENCODING": "utf-8"}.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(key, raising=False)
    _close_hub_session()  # the next request builds its client from this environment
    yield state
    _close_hub_session()
    for server in servers:
        server.shutdown()
        server.server_close()


def _close_hub_session():
    from huggingface_hub import utils

    (getattr(utils, "close_session", None) or utils.reset_sessions)()  # the name before 1.0


def _run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "numpy_gpt2", *map(str, args)], cwd=cwd, env=dict(os.environ),
                          capture_output=True, text=True, encoding="utf-8", timeout=TIMEOUT,
                          stdin=subprocess.DEVNULL)


def _assert_same_files(directory, files):
    for name, data in files.items():
        assert (directory / name).read_bytes() == data, name
    assert not (directory / "tokenizer.json").exists()  # optional, and not in the repo


def _assert_logits_match(directory, ref):
    ids = np.random.default_rng(0).integers(0, ref.config["vocab_size"], size=(2, 11))
    expected = ref.logits(ids)
    np.testing.assert_allclose(GPT2.from_pretrained(str(directory))(ids), expected, rtol=0,
                               atol=tolerance(expected, "float32", ref.config))


def _gets(hub, role):
    return [r for r in hub.requests if r.role == role and r.method == "GET"]


# --- Fresh downloads. -----------------------------------------------------------------------

def test_cli_download_gives_the_served_files_and_they_load(hub, repo_files, tiny_ref, tmp_path):
    out = tmp_path / "out"
    result = _run_cli("download", REPO, "--dir", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{out}: ") and "parameters" in result.stdout
    assert len(result.stdout.splitlines()) == 1
    _assert_same_files(out, repo_files)
    _assert_logits_match(out, tiny_ref)
    assert len(_gets(hub, "cdn")) == 1


@pytest.mark.parametrize("name, local", [(REPO, "tiny-gpt2"), ("gpt2", "gpt2")])
def test_api_download_into_weights_name(hub, repo_files, tiny_ref, tmp_path, monkeypatch, name, local):
    monkeypatch.chdir(tmp_path)
    path = download(name, quiet=True)
    assert path == pathlib.Path("weights") / local
    _assert_same_files(path, repo_files)
    _assert_logits_match(path, tiny_ref)
    assert resolve_model(name) == str(path)  # where `generate --model NAME` looks

    # A second run finds every file there with the hub's checksum and downloads nothing.
    before = len(hub.requests)
    assert download(name, quiet=True) == path
    assert hub.requests[before:] and all(r.method == "HEAD" for r in hub.requests[before:])


def test_later_files_come_from_the_commit_the_first_resolved_to(hub, tmp_path):
    download(REPO, tmp_path / "out", quiet=True)
    heads = [r.path for r in hub.requests if r.method == "HEAD"]
    assert heads[0] == f"/{REPO}/resolve/main/config.json"
    assert len(heads) == 6 and all(f"/resolve/{COMMIT}/" in p for p in heads[1:])


def test_a_damaged_file_on_disk_is_downloaded_again(hub, repo_files, tmp_path):
    out = download(REPO, tmp_path / "out", quiet=True)
    damaged = bytearray(repo_files["model.safetensors"])
    damaged[-1] ^= 1
    (out / "model.safetensors").write_bytes(bytes(damaged))
    before = len(_gets(hub, "cdn"))
    download(REPO, out, quiet=True)
    assert len(_gets(hub, "cdn")) == before + 1
    assert (out / "model.safetensors").read_bytes() == repo_files["model.safetensors"]


# --- Resuming and checking. -----------------------------------------------------------------

def test_a_partial_download_is_resumed_with_a_range_request(hub, repo_files, tmp_path):
    from huggingface_hub._local_folder import get_local_download_paths

    out = tmp_path / "out"
    data = repo_files["model.safetensors"]
    half = len(data) // 2
    partial = get_local_download_paths(out, "model.safetensors").incomplete_path(_sha256(data))
    partial.write_bytes(data[:half])
    download(REPO, out, quiet=True)
    assert [r.headers.get("range") for r in _gets(hub, "cdn")] == [f"bytes={half}-"]
    assert (out / "model.safetensors").read_bytes() == data
    assert not partial.exists()


def test_a_corrupt_download_is_refused_and_deleted(hub, repo_files, tmp_path):
    out = tmp_path / "out"
    sha = _sha256(repo_files["model.safetensors"])
    hub.corrupt.add(sha)
    with pytest.raises(CheckpointError) as info:
        download(REPO, out, quiet=True)
    message = str(info.value)
    assert "model.safetensors" in message and "sha256" in message
    assert sha in message and _sha256(hub.served(sha)) in message
    assert not (out / "model.safetensors").exists()
    assert not list(out.rglob("*.incomplete"))
    assert _gets(hub, "cdn")


# --- What is not on the hub. ----------------------------------------------------------------

@pytest.mark.parametrize("name, revision, words", [
    ("user/no-such-repo", "main", ["user/no-such-repo", "not found"]),
    (REPO, "v9", [REPO, "'v9'"]),
    ("user/config-only", "main", ["user/config-only", "model.safetensors"]),
])
def test_what_the_hub_lacks_is_model_not_found(hub, tmp_path, name, revision, words):
    with pytest.raises(ModelNotFoundError) as info:
        download(name, tmp_path / "out", revision=revision, quiet=True)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert hub.requests


def test_a_malformed_repo_id_is_a_gpt2_error(hub, tmp_path):
    with pytest.raises(GPT2Error, match="neither a published name"):
        download("not a/valid id", tmp_path / "out", quiet=True)


# --- Offline mode. --------------------------------------------------------------------------

def test_offline_with_nothing_on_disk_says_so(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match=r"offline mode is on \(HF_HUB_OFFLINE=1\)"):
        download(REPO, tmp_path / "out", quiet=True)
    assert not hub.requests


def test_offline_with_a_checked_download_on_disk_succeeds(hub, tmp_path, monkeypatch):
    out = download(REPO, tmp_path / "out", quiet=True)
    before = len(hub.requests)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    assert download(REPO, out, quiet=True) == out
    assert len(hub.requests) == before


# --- Authentication. ------------------------------------------------------------------------

def test_hf_token_goes_to_the_hub_and_not_to_the_cdn(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    download(REPO, tmp_path / "out", quiet=True)
    assert {r.headers.get("authorization") for r in hub.requests if r.role == "hub"} == {f"Bearer {TOKEN}"}
    assert _gets(hub, "cdn") and all("authorization" not in r.headers for r in _gets(hub, "cdn"))


# --- The command line's errors: one line on stderr. -----------------------------------------

def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case, args, env, words", [
    ("missing repo", ["user/no-such-repo"], {}, ["user/no-such-repo", "not found"]),
    ("offline", [REPO], {"HF_HUB_OFFLINE": "1"}, ["offline mode is on"]),
    ("unreachable", [REPO], {"HF_ENDPOINT": "http://127.0.0.1:{closed}"}, ["cannot reach http://127.0.0.1:"]),
    ("corrupt", [REPO], {}, ["model.safetensors", "sha256 mismatch"]),
])
def test_cli_errors_are_one_line(hub, repo_files, tmp_path, monkeypatch, case, args, env, words):
    for key, value in env.items():
        monkeypatch.setenv(key, value.format(closed=_closed_port()))
    if case == "corrupt":
        hub.corrupt.add(_sha256(repo_files["model.safetensors"]))
    result = _run_cli("download", *args, "--dir", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("numpy-gpt2: error: "), result.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert bool(hub.requests) == (case in ("missing repo", "corrupt"))


_WITHOUT_HUB = """
import sys

class BlockHuggingfaceHub:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "huggingface_hub":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, BlockHuggingfaceHub())
import numpy_gpt2, numpy_gpt2.cli, numpy_gpt2.download  # none of them may need huggingface_hub
sys.exit(numpy_gpt2.cli.main(sys.argv[1:]))
"""


def test_without_huggingface_hub_the_cli_says_how_to_get_it(tmp_path):
    result = subprocess.run([sys.executable, "-c", _WITHOUT_HUB, "download", "gpt2", "--dir", tmp_path / "out"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 1
    assert result.stderr == ("numpy-gpt2: error: numpy-gpt2 download needs huggingface_hub: "
                             "pip install huggingface_hub\n")
    assert not (tmp_path / "out").exists()


def test_a_name_not_on_disk_suggests_the_download_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(ModelNotFoundError, match=r"or run: numpy-gpt2 download gpt7$"):
        resolve_model("gpt7")
