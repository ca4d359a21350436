"""Turn what a user types for --model into a path on disk.

A path (directory or file) is taken as it is. A name (gpt2, gpt2-medium, gpt2-large, gpt2-xl,
distilgpt2, or a hub repo id such as openai-community/gpt2) is looked for, in order, in
`./weights/NAME/`, in `weights/NAME/` of the checkout this package runs from (when it runs
from one), and in the Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub, else
~/.cache/huggingface/hub). The name `fortunes` is the small model installed with the package
(`weights/fortunes/` of the checkout), which `default_model` falls back to when GPT-2 is not found.
"""

import difflib
import os
import pathlib

from ..errors import ModelNotFoundError

# The hub repos of the published sizes; the old unprefixed ids are in the cache of older installs.
HUB_REPOS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}
_PACKAGE = pathlib.Path(__file__).resolve().parents[1]
# weights/ beside the package only in a checkout: installed, the package's parent is site-packages.
_CHECKOUT_WEIGHTS = _PACKAGE.parent / "weights" if (_PACKAGE.parent / "setup.cfg").is_file() else None
BUNDLED = "fortunes"


def hub_cache_dir() -> pathlib.Path:
    """The Hugging Face hub cache, as huggingface_hub chooses it."""
    if os.environ.get("HF_HUB_CACHE"):
        return pathlib.Path(os.environ["HF_HUB_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return pathlib.Path(hf_home).expanduser() / "hub"


def _local_dir_name(name: str) -> str:
    return name.split("/")[-1]


def candidate_dirs(name: str) -> list:
    """Every directory where the checkpoint called `name` may be, in search order."""
    local = _local_dir_name(name)
    dirs = [pathlib.Path("weights") / local] + ([_CHECKOUT_WEIGHTS / local] if _CHECKOUT_WEIGHTS else [])
    if name == BUNDLED:
        dirs += _bundled_dirs()
    repos = [HUB_REPOS.get(name, name)]
    if "/" not in name:
        repos.append(name)
    for repo in repos:
        repo_dir = hub_cache_dir() / ("models--" + repo.replace("/", "--"))
        dirs.extend(_snapshots(repo_dir))
    unique = []
    for d in dirs:
        if d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def _snapshots(repo_dir: pathlib.Path) -> list:
    """The snapshot the cache's refs/main points at first, then any others, newest first."""
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return [snapshots / "<revision>"]
    ordered = []
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        ordered.append(snapshots / ref.read_text().strip())
    others = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    return ordered + [p for p in others if p not in ordered]


def known_names() -> list:
    """The published names, and the directories of weights/ (here and in the checkout) holding a checkpoint."""
    names = list(HUB_REPOS) + [BUNDLED]
    for weights in (pathlib.Path("weights"), _CHECKOUT_WEIGHTS):
        if weights is not None and weights.is_dir():
            names += [d.name for d in sorted(weights.iterdir()) if _has_checkpoint(d) and d.name not in names]
    return names


def _has_checkpoint(d: pathlib.Path) -> bool:
    return any((d / name).is_file() for name in ("model.safetensors", "model.int8.safetensors", "hparams.json"))


def _looks_like_path(text: str) -> bool:
    """A path, not a name: starts like one, ends in a weight suffix, or has more than one '/'."""
    return (text.startswith((".", "/", "~")) or text.endswith((".safetensors", ".json"))
            or text.count("/") > 1 or os.sep != "/" and os.sep in text)


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """The path to load for `name_or_path`; raises ModelNotFoundError saying where it looked."""
    text = os.fspath(name_or_path)
    if os.path.exists(text):
        return text
    if _looks_like_path(text):
        raise ModelNotFoundError(f"{text}: no such file or directory")
    dirs = candidate_dirs(text)
    for d in dirs:
        if _has_checkpoint(d):
            return str(d)
    looked = "; ".join(str(d) for d in dirs)
    known = known_names()
    near = [] if text in known else difflib.get_close_matches(text, known, n=1)
    guess = f" Did you mean {near[0]}?" if near else ""
    raise ModelNotFoundError(
        f"model {text!r} not found; looked in: {looked}.{guess} Put config.json + model.safetensors "
        f"(from the hub repo {HUB_REPOS.get(text, text)}) in weights/{_local_dir_name(text)}/, "
        f"give --model a directory or .safetensors file, or run: numpy-gpt2 download {text}"
    )


def _bundled_dirs() -> list:
    """Where the package's own small model is: installed, numpy_gpt2/bundled/; in a checkout, weights/fortunes/."""
    return [_PACKAGE / "bundled"] + ([_CHECKOUT_WEIGHTS / BUNDLED] if _CHECKOUT_WEIGHTS else [])


def bundled_model() -> str:
    """The small model installed with the package (not a ./weights/fortunes/ of the working directory)."""
    for d in _bundled_dirs():
        if _has_checkpoint(d):
            return str(d)
    raise ModelNotFoundError(f"the bundled model is missing from {_PACKAGE / 'bundled'}: reinstall numpy-gpt2")


def default_model() -> tuple:
    """--model when none is given: GPT-2 where its weights are found, else the bundled model.

    -> (path, note): note is None for GPT-2, else the line to tell the user which model runs.
    """
    try:
        return resolve_model("gpt2"), None
    except ModelNotFoundError:
        pass
    note = (f"no --model and no GPT-2 weights found, so using the bundled model '{BUNDLED}' (7.7M parameters "
            "trained on Debian's fortunes; not GPT-2). For GPT-2 itself: pip install huggingface_hub && "
            "numpy-gpt2 download gpt2")
    return bundled_model(), note
