"""`numpy-gpt2 download`: fetch a GPT-2 checkpoint from the Hugging Face hub into a directory.

huggingface_hub does the talking to the hub, so HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE and its
progress bars work as they do everywhere else. The files land in the layout that
`hf_hub_download(local_dir=...)` leaves (bookkeeping in `DIR/.cache/huggingface/download/`), so
each tool recognises the other's files. This module adds two things hf_hub_download (2.x) lacks:
- resuming: a download cut short (Ctrl-C, a dropped connection) keeps its bytes in the
  `.incomplete` file huggingface_hub names for it, and the next run asks only for the rest (an
  HTTP Range request); hf_hub_download starts again from zero each time.
- checking: each downloaded file is hashed and compared with the hub's checksum, its ETag: the
  sha256 of the content for LFS files (model.safetensors), the git blob sha1 for small files;
  hf_hub_download checks only the size.

huggingface_hub is an optional dependency (`pip install huggingface_hub`, the `download` extra), imported here
only when a download is asked for.
"""

import contextlib
import hashlib
import os
import pathlib
import re
import sys
import urllib.parse

from .errors import CheckpointError, GPT2Error, ModelNotFoundError
from .weights import load_checkpoint
from .weights.resolve import HUB_REPOS

REQUIRED_FILES = ("config.json", "model.safetensors")
# The tokenizer files: numpy-gpt2 ships GPT-2's own, so a repo without them still works.
OPTIONAL_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "generation_config.json")

_MISSING_HUB = "numpy-gpt2 download needs huggingface_hub: pip install huggingface_hub"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_GIT_SHA1 = re.compile(r"[0-9a-f]{40}")


def download(name_or_repo: str, directory: str | os.PathLike | None = None, revision: str = "main",
             quiet: bool = False) -> pathlib.Path:
    """Download a GPT-2 checkpoint from the hub and check that it loads; returns its directory.

    `name_or_repo` is a published name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2) or a
    hub repo id (`user/my-gpt2`). The files (config.json, model.safetensors, and vocab.json,
    merges.txt, tokenizer.json, generation_config.json where the repo has them) go to
    `directory`, by default `weights/NAME` under the current directory, NAME being the last part
    of the repo id. Files already there with the hub's checksum are kept; a partial download left
    by an earlier run is resumed. `quiet` turns off the progress bars.

    Raises ModelNotFoundError (no such repo, revision or required file; offline mode with the
    files not on disk), CheckpointError (a checksum mismatch, or weights that do not load),
    GPT2Error (huggingface_hub missing, a malformed repo id) or OSError (the hub unreachable or
    failing).
    """
    _import_hub()
    repo = HUB_REPOS.get(name_or_repo, name_or_repo)
    if directory is None:
        directory = pathlib.Path("weights") / repo.split("/")[-1]
    directory = pathlib.Path(directory)
    from huggingface_hub import constants

    with _hub_errors(repo, revision), _progress_bars(enabled=not quiet):
        if constants.HF_HUB_OFFLINE:
            _check_already_downloaded(repo, directory)
        else:
            commit = revision
            for filename in REQUIRED_FILES + OPTIONAL_FILES:
                # Every file after the first comes from the commit the first one resolved to,
                # so a push to the repo during the download cannot mix two versions.
                commit = _fetch(repo, commit, filename, directory, filename in REQUIRED_FILES) or commit
    load_checkpoint(directory)
    return directory


def summary(directory: str | os.PathLike) -> str:
    """One line on the checkpoint in `directory`: the path, parameter count, shape and file size."""
    checkpoint = load_checkpoint(directory)
    c = checkpoint.config
    parameters = sum(a.size for a in checkpoint.tensors.values())
    size = os.path.getsize(checkpoint.path) / 2**20
    return (f"{directory}: {parameters:,} parameters (n_layer={c.n_layer}, n_head={c.n_head}, "
            f"n_embd={c.n_embd}, vocab_size={c.vocab_size}, n_positions={c.n_positions}), "
            f"model.safetensors {size:.1f} MiB")


def _import_hub():
    try:
        import huggingface_hub  # noqa: F401
    except ImportError as exc:
        if exc.name != "huggingface_hub":
            raise GPT2Error(f"huggingface_hub is installed but does not import: {exc}") from exc
        raise GPT2Error(_MISSING_HUB) from None


def _fetch(repo: str, revision: str, filename: str, directory: pathlib.Path, required: bool) -> str | None:
    """Bring `directory/filename` up to date with the hub.

    Returns the commit the file was found at, or None for an optional file the repo lacks.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub._local_folder import get_local_download_paths, write_download_metadata
    from huggingface_hub.utils import EntryNotFoundError, WeakFileLock, build_hf_headers

    url = hf_hub_url(repo, filename, revision=revision)
    try:
        meta = get_hf_file_metadata(url)
    except EntryNotFoundError as exc:
        if not required:
            return None
        raise ModelNotFoundError(
            f"hub repo {repo} has no {filename} at revision {revision}; numpy-gpt2 needs "
            f"{' and '.join(REQUIRED_FILES)}"
        ) from exc
    if meta.commit_hash is None or meta.etag is None:
        raise GPT2Error(f"{url}: the response has no X-Repo-Commit or ETag header; is "
                        f"HF_ENDPOINT={constants.ENDPOINT} a Hugging Face hub?")
    paths = get_local_download_paths(directory, filename)
    # A file already there is hashed again, not trusted from the record of its download: a
    # damaged file keeps its modification time.
    if not (paths.file_path.is_file() and _content_hash(paths.file_path, meta.etag) == meta.etag):
        headers = build_hf_headers()
        if not _same_origin(url, meta.location):
            # LFS files are served from a CDN: the token is for the hub only, as hf_hub_download does.
            headers.pop("authorization", None)
        with WeakFileLock(paths.lock_path):
            _download_checked(meta, paths.incomplete_path(meta.etag), paths.file_path, filename, repo, headers)
    write_download_metadata(directory, filename, commit_hash=meta.commit_hash, etag=meta.etag)
    return meta.commit_hash


def _download_checked(meta, partial: pathlib.Path, target: pathlib.Path, filename: str, repo: str,
                      headers: dict) -> None:
    """Download to `partial`, resuming from what it holds; move it to `target` once its hash is right."""
    from huggingface_hub.file_download import http_get

    done = partial.stat().st_size if partial.is_file() else 0
    if meta.size is not None and done > meta.size:  # not a prefix of this file
        partial.unlink()
        done = 0
    with open(partial, "ab") as f:
        http_get(meta.location, f, resume_size=done, headers=headers, expected_size=meta.size,
                 displayed_filename=filename)
    found = _content_hash(partial, meta.etag)
    if found is not None and found != meta.etag:
        partial.unlink()
        raise CheckpointError(
            f"{filename} from hub repo {repo}: {_hash_name(meta.etag)} mismatch: the hub says "
            f"{meta.etag}, the downloaded file has {found}; the corrupt download was deleted, "
            "run the command again"
        )
    os.replace(partial, target)


def _check_already_downloaded(repo: str, directory: pathlib.Path) -> None:
    """Offline: accept `directory` only if each required file still has the checksum the hub gave
    when it was downloaded (recorded in `.cache/huggingface/download/`)."""
    from huggingface_hub._local_folder import read_download_metadata

    def checked(filename):
        path = directory / filename
        recorded = path.is_file() and read_download_metadata(directory, filename)
        return bool(recorded) and _content_hash(path, recorded.etag) == recorded.etag

    missing = [f for f in REQUIRED_FILES if not checked(f)]
    if missing:
        raise ModelNotFoundError(
            f"offline mode is on (HF_HUB_OFFLINE=1) and {directory} has no checked download of "
            f"{', '.join(missing)}; unset HF_HUB_OFFLINE to download {repo}"
        )


def _content_hash(path: pathlib.Path, etag: str) -> str | None:
    """`path`'s hash of the kind the hub's `etag` is, or None when the etag is of no known kind.

    The hub's ETag is the sha256 of the content for an LFS file and the git blob sha1 (sha1 of
    "blob <size>\\0" + content) for a file stored in git.
    """
    if _SHA256.fullmatch(etag):
        h = hashlib.sha256()
    elif _GIT_SHA1.fullmatch(etag):
        h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    else:
        return None
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _hash_name(etag: str) -> str:
    return "sha256" if _SHA256.fullmatch(etag) else "git blob sha1"


def _same_origin(a: str, b: str) -> bool:
    a, b = urllib.parse.urlsplit(a), urllib.parse.urlsplit(b)
    return (a.scheme, a.netloc) == (b.scheme, b.netloc)


def _transport_errors() -> tuple:
    """The connection-level exceptions of the HTTP library huggingface_hub uses (by version:
    httpx2, httpx or requests); only the ones already imported, so none is imported for this."""
    names = (("httpx2", "TransportError"), ("httpx", "TransportError"),
             ("requests", "ConnectionError"), ("requests", "Timeout"))
    return tuple(getattr(sys.modules[m], n) for m, n in names if m in sys.modules)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@contextlib.contextmanager
def _hub_errors(repo: str, revision: str):
    """Turn huggingface_hub's exceptions into one-line GPT2Errors and OSErrors that say what to do."""
    from huggingface_hub import constants
    from huggingface_hub.utils import (GatedRepoError, HfHubHTTPError, HFValidationError, OfflineModeIsEnabled,
                                       RepositoryNotFoundError, RevisionNotFoundError)

    try:
        yield
    except GatedRepoError as exc:
        raise ModelNotFoundError(f"hub repo {repo} is gated: accept its terms on its hub page and set "
                                 "HF_TOKEN to a token of that account") from exc
    except RepositoryNotFoundError as exc:
        raise ModelNotFoundError(
            f"hub repo {repo} not found at {constants.ENDPOINT} (for a private repo, set HF_TOKEN); "
            f"the published names are {', '.join(HUB_REPOS)}"
        ) from exc
    except RevisionNotFoundError as exc:
        raise ModelNotFoundError(f"hub repo {repo} has no revision {revision!r}") from exc
    except OfflineModeIsEnabled as exc:
        raise GPT2Error(f"offline mode is on (HF_HUB_OFFLINE=1): cannot download {repo}") from exc
    except HfHubHTTPError as exc:
        response = exc.response
        status = getattr(response, "status_code", "?")
        reason = getattr(response, "reason_phrase", None) or getattr(response, "reason", "") or ""
        detail = f": {_one_line(exc.server_message)}" if getattr(exc, "server_message", None) else ""
        hint = "; check HF_TOKEN" if status in (401, 403) else ""
        raise ConnectionError(f"{getattr(response, 'url', constants.ENDPOINT)}: HTTP {status} {reason}"
                              f"{detail}{hint}") from exc
    except HFValidationError as exc:
        raise GPT2Error(f"{repo!r} is neither a published name ({', '.join(HUB_REPOS)}) nor a hub repo "
                        f"id such as user/my-gpt2: {_one_line(exc)}") from exc
    except OSError as exc:
        if exc.errno is None and "\n" in str(exc):  # huggingface_hub's multi-line messages
            raise OSError(_one_line(exc)) from exc
        raise
    except Exception as exc:
        if isinstance(exc, _transport_errors()):
            raise ConnectionError(f"cannot reach {constants.ENDPOINT}: {_one_line(exc) or type(exc).__name__}; "
                                  "check the network, or HF_ENDPOINT") from exc
        raise


@contextlib.contextmanager
def _progress_bars(enabled: bool):
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if enabled or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()
