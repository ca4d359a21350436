"""The `numpy-gpt2` command line, run as a user runs it: a subprocess of `python -m numpy_gpt2`.

References trusted here: Hugging Face transformers (`GPT2LMHeadModel.generate`, greedy, on the
tiny reference weights; the parameter count torch reports), the GPT-2 ids of "Hello world"
([15496, 995], as every GPT-2 tokenizer gives them), and the tiny reference's config.
Continuations are decoded with numpy_gpt2's Tokenizer, which test_tokenizer checks against
tiktoken. Each run has a timeout; there are about twenty runs, so the file stays quick.
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from numpy_gpt2.tokenizer import Tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 120
# Five GPT-2 tokens, all below 1000, the tiny reference's vocabulary size.
PROMPT = "I am a man and"
HELLO_WORLD_IDS = [15496, 995]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment of every run: an empty Hugging Face cache, so no real one is found."""
    hub = tmp_path_factory.mktemp("empty-hub-cache")
    return {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}


def _run(env, *args, command=(sys.executable, "-m", "numpy_gpt2"), **kwargs):
    kwargs.setdefault("stdin", None if "input" in kwargs else subprocess.DEVNULL)
    return subprocess.run([*command, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, encoding="utf-8", timeout=TIMEOUT, **kwargs)


def _ok(result) -> str:
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def test_prompt_fits_the_tiny_vocabulary():
    ids = Tokenizer.default().encode(PROMPT)
    assert len(ids) == 5 and max(ids) < 1000


def test_generate_greedy_matches_transformers(tiny_ref, env):
    torch = pytest.importorskip("torch")
    tokenizer = Tokenizer.default()
    ids = tokenizer.encode(PROMPT)
    with torch.no_grad():
        out = tiny_ref.torch_model.generate(torch.tensor([ids]), attention_mask=torch.ones_like(torch.tensor([ids])),
                                            do_sample=False, max_new_tokens=20, pad_token_id=0)
    continuation = out[0, len(ids):].tolist()
    assert len(continuation) == 20
    stdout = _ok(_run(env, "generate", PROMPT, "--model", tiny_ref.hub_dir, "--greedy",
                      "--max-new-tokens", 20, "--no-stream", "--no-eos"))
    assert stdout == PROMPT + tokenizer.decode(continuation) + "\n"


SAMPLE = ("--temperature", 1.5, "--max-new-tokens", 30, "--no-eos")


@pytest.fixture(scope="module")
def sampled(tiny_ref, env):
    """Sampled outputs: the prompt on stdin or as an argument, streamed or not, seeds 1 and 2."""
    model = ("--model", tiny_ref.hub_dir)
    return {
        "stdin, seed 1": _ok(_run(env, "generate", *model, *SAMPLE, "--seed", 1, "--no-stream", input=PROMPT)),
        "seed 1": _ok(_run(env, "generate", PROMPT, *model, *SAMPLE, "--seed", 1, "--no-stream")),
        "stream, seed 1": _ok(_run(env, "generate", PROMPT, *model, *SAMPLE, "--seed", 1, "--stream")),
        "seed 2": _ok(_run(env, "generate", PROMPT, *model, *SAMPLE, "--seed", 2, "--no-stream")),
    }


def test_prompt_from_stdin_and_same_seed_same_text(sampled):
    assert sampled["seed 1"].startswith(PROMPT) and len(sampled["seed 1"]) > len(PROMPT) + 10
    assert sampled["stdin, seed 1"] == sampled["seed 1"]


def test_stream_prints_what_no_stream_prints(sampled):
    assert sampled["stream, seed 1"] == sampled["seed 1"]


def test_different_seeds_differ(sampled):
    # 30 tokens at temperature 1.5 over the top 50: two seeds agreeing would be a broken seed.
    assert sampled["seed 2"].startswith(PROMPT)
    assert sampled["seed 2"] != sampled["seed 1"]


def test_tokenize(env):
    stdout = _ok(_run(env, "tokenize", "Hello world"))
    assert stdout == f"{HELLO_WORLD_IDS[0]}\t'Hello'\n{HELLO_WORLD_IDS[1]}\t' world'\n"


def test_tokenize_ids_only_from_stdin(env):
    assert _ok(_run(env, "tokenize", "--ids-only", input="Hello world")) == "15496 995\n"


def test_info(tiny_ref, env):
    stdout = _ok(_run(env, "info", "--model", tiny_ref.hub_dir))
    fields = dict(line.split(None, 1) for line in stdout.splitlines())
    # torch's parameters() yields the tied wte / lm_head weight once.
    assert fields["parameters"] == f"{sum(p.numel() for p in tiny_ref.torch_model.parameters()):,}"
    hf = tiny_ref.torch_model.config
    for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        assert fields[name] == str(getattr(hf, name)), name
    assert fields["n_inner"] == str(tiny_ref.torch_model.transformer.h[0].mlp.c_fc.weight.shape[1])
    assert float(fields["layer_norm_epsilon"]) == hf.layer_norm_epsilon
    assert fields["file"].startswith(str(tiny_ref.hub_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def truncated_dir(tiny_ref, tmp_path_factory):
    """A copy of the tiny checkpoint whose model.safetensors stops halfway."""
    directory = tmp_path_factory.mktemp("truncated")
    shutil.copyfile(tiny_ref.hub_dir / "config.json", directory / "config.json")
    data = (tiny_ref.hub_dir / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(data[:len(data) // 2])
    return directory


@pytest.fixture(scope="module")
def bad_vocab_dir(tiny_ref, tmp_path_factory):
    """A copy of the tiny checkpoint with a vocab.json that is not JSON (read while the weights load)."""
    directory = tmp_path_factory.mktemp("bad-vocab")
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(tiny_ref.hub_dir / name, directory / name)
    (directory / "vocab.json").write_text('{"!": 0,')
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return directory


ERRORS = {
    "missing model dir": (["generate", PROMPT, "--model", "{tmp}/nowhere"], {},
                          r"{tmp}/nowhere: no such file or directory"),
    "truncated file": (["generate", PROMPT, "--model", "{truncated}"], {},
                       r"{truncated}/model\.safetensors: .*\(truncated file\)"),
    "corrupt vocab.json": (["generate", PROMPT, "--model", "{bad_vocab}"], {}, r"{bad_vocab}/vocab\.json: malformed JSON"),
    "negative temperature": (["generate", PROMPT, "--model", "{model}", "--temperature", "-1"], {},
                             r"argument --temperature: must be a number >= 0, found -1"),
    "top-p 0": (["generate", PROMPT, "--model", "{model}", "--top-p", "0"], {},
                r"argument --top-p: must be in \(0, 1\], found 0"),
    "top-p 1.5": (["generate", PROMPT, "--model", "{model}", "--top-p", "1.5"], {},
                  r"argument --top-p: must be in \(0, 1\], found 1\.5"),
    "empty prompt": (["generate", "", "--model", "{model}"], {}, r"the prompt is empty"),
    "unknown name": (["generate", PROMPT, "--model", "gpt7"], {},
                     r"model 'gpt7' not found; looked in: weights/gpt7; .*{hub}/models--gpt7/"),
    "context too long": (["generate", PROMPT, "--model", "{model}", "--max-new-tokens", "100"], {},
                         r"prompt of 5 tokens \+ --max-new-tokens 100 exceeds the model's context of "
                         r"n_positions=40; .* at most 35 new tokens"),
    "prompt fills the context": (["generate", " ".join([PROMPT] * 8), "--model", "{model}"], {},
                                 r"prompt of 40 tokens is too long for the model's context of n_positions=40; "
                                 r"shorten it to at most 39 tokens$"),
    "sampling at temperature 0": (["generate", PROMPT, "--model", "{model}", "--temperature", "0"], {},
                                  r"--temperature 0 .*--greedy"),
    "empty stop text": (["generate", PROMPT, "--model", "{model}", "--stop", ""], {},
                        r"argument --stop: must not be empty"),
    "zero new tokens": (["generate", PROMPT, "--model", "{model}", "--max-new-tokens", "0"], {},
                        r"argument --max-new-tokens: must be a positive integer, found 0"),
    "token outside vocab": (["generate", "Hello world", "--model", "{model}"], {},
                            r"the prompt has token 15496, outside the model's vocabulary of 1000"),
    "no prompt, empty stdin": (["generate", "--model", "{model}"], {"stdin": subprocess.DEVNULL},
                               r"the prompt is empty"),
    "bad subcommand": (["frobnicate"], {}, r"invalid choice: 'frobnicate'"),
    "--n-head beside a config.json": (["generate", PROMPT, "--model", "{model}", "--n-head", "3"], {},
                                      r"--n-head: {model}/config\.json sets the number of heads"),
    "info --n-head beside a config.json": (["info", "--model", "{model}", "--n-head", "3"], {},
                                           r"--n-head: {model}/config\.json sets the number of heads"),
    "convert --n-head beside a config.json": (["convert", "{model}", "{tmp}/out", "--n-head", "3"], {},
                                              r"--n-head: {model}/config\.json sets the number of heads"),
    "near-miss name": (["generate", PROMPT, "--model", "gtp2"], {},
                       r"model 'gtp2' not found; looked in: .*\. Did you mean gpt2\? Put .*numpy-gpt2 download gtp2$"),
    "near-miss name, medium": (["info", "--model", "gpt2-meduim"], {}, r"Did you mean gpt2-medium\?"),
    "known name, absent": (["generate", PROMPT, "--model", "gpt2-xl"], {},
                           r"model 'gpt2-xl' not found; .*numpy-gpt2 download gpt2-xl$"),
    "--model a config.json": (["info", "--model", "{model}/config.json"], {},
                              r"{model}/config\.json: --model takes the model's directory .*; give --model {model}$"),
    "tokenize, missing model dir": (["tokenize", "Hello", "--model", "{tmp}/nope"], {},
                                    r"{tmp}/nope: no such file or directory"),
    "tokenize, unknown name": (["tokenize", "Hello", "--model", "nope"], {}, r"model 'nope' not found"),
    "negative seed": (["generate", PROMPT, "--model", "{model}", "--seed", "-1"], {},
                      r"argument --seed: must be an integer >= 0, found -1"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_error_is_one_line(case, tiny_ref, truncated_dir, bad_vocab_dir, env, tmp_path):
    """Every known error: non-zero exit, one line on stderr naming the problem, nothing on stdout."""
    args, kwargs, pattern = ERRORS[case]
    places = {"tmp": tmp_path, "model": tiny_ref.hub_dir, "truncated": truncated_dir, "bad_vocab": bad_vocab_dir,
              "hub": env["HF_HUB_CACHE"]}
    args = [a.format(**places) for a in args]
    pattern = pattern.format(**{k: re.escape(str(v)) for k, v in places.items()})
    result = _run(env, *args, **kwargs)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), result.stderr
    assert re.match(r"numpy-gpt2( generate)?: error: ", lines[0]), lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    assert not re.search(r"do_sample|stop_strings|max_new_tokens|top_k|top_p|eos_token_id", lines[0]), lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize("where", ["stdin", "argument"])
def test_prompt_not_utf8_is_refused(where, tiny_ref, env):
    """The bytes are not replaced by U+FFFD: the prompt is refused, naming the first bad byte."""
    prompt = b"I am \xff a man"
    argv = [sys.executable, "-m", "numpy_gpt2", "generate", "--model", str(tiny_ref.hub_dir)]
    if where == "argument":
        argv.insert(4, prompt)
    result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, timeout=TIMEOUT,
                            input=prompt if where == "stdin" else b"")
    assert result.returncode == 1 and result.stdout == b""
    assert result.stderr.decode().splitlines() == [
        f"numpy-gpt2: error: the prompt{' on standard input' if where == 'stdin' else ''} is not UTF-8: "
        "byte 0xff at offset 5"]


def test_piped_prompt_loses_one_trailing_newline(tiny_ref, env):
    """`echo PROMPT | numpy-gpt2 generate` continues PROMPT, not PROMPT + a line break."""
    options = ("--model", tiny_ref.hub_dir, "--greedy", "--max-new-tokens", 5, "--no-stream", "--no-eos")
    assert _ok(_run(env, "generate", *options, input=PROMPT + "\n")) == _ok(_run(env, "generate", PROMPT, *options))
    assert _ok(_run(env, "tokenize", "--ids-only", input="Hello world\n")) == "15496 995\n"
    assert _ok(_run(env, "tokenize", "--ids-only", input="Hello world\n\n")) == "15496 995 198\n"


def test_convert_into_an_unrelated_directory_is_refused(tiny_ref, env, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = _run(env, "convert", tiny_ref.hub_dir, tmp_path)
    assert result.returncode == 1
    assert result.stderr == (f"numpy-gpt2: error: {tmp_path}: is not empty and holds no model (notes.txt); "
                             "convert into a new or empty directory, or use --force (force=True) to write into it\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    _ok(_run(env, "convert", tiny_ref.hub_dir, tmp_path, "--force"))
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "notes.txt").read_text() == "mine"


def _file_size_limit(limit):
    """A preexec_fn: writes past `limit` bytes fail with EFBIG, a real write error from the
    kernel (SIGXFSZ ignored, so the write returns the error instead of killing the process)."""
    def limit_writes():
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return limit_writes


def test_write_error_names_the_destination_not_a_temporary_file(tiny_ref, env, tmp_path):
    """The model file fails part-way (the tiny model is ~1.5 MB, writes stop at 64 KiB): the one
    line names DST/model.safetensors, and no temporary file is left beside it."""
    dst = tmp_path / "out"
    result = _run(env, "convert", tiny_ref.hub_dir, dst, preexec_fn=_file_size_limit(64 * 1024))
    assert result.returncode == 1
    assert result.stderr == (f"numpy-gpt2: error: [Errno 27] cannot write {dst / 'model.safetensors'}: "
                             "File too large\n")
    assert not [p.name for p in dst.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("flags", [("--seed", "-1"), ("--stop", "")])
def test_bad_flag_value_is_a_usage_error(flags, env):
    result = _run(env, "generate", PROMPT, *flags)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"numpy-gpt2 generate: error: argument {flags[0]}: ")


def test_help(env):
    stdout = _ok(_run(env, "--help"))
    for command in ("generate", "tokenize", "info"):
        assert command in stdout


def test_version(env):
    import numpy_gpt2

    assert _ok(_run(env, "--version")) == f"numpy-gpt2 {numpy_gpt2.__version__}\n"


def test_info_help_describes_it(env):
    stdout = _ok(_run(env, "info", "--help"))
    assert re.search(r"\n\nDescribe the checkpoint MODEL", stdout), stdout


# Raises KeyboardInterrupt at the first import of MODULE, as Ctrl-C while it loads does; then runs
# the console script's own two lines (`from numpy_gpt2.__main__ import main; sys.exit(main())`).
_INTERRUPTED_IMPORT = """
import builtins, sys
real_import = builtins.__import__

def interrupted(name, globals=None, locals=None, fromlist=(), level=0):
    if name == {module!r}:
        raise KeyboardInterrupt
    return real_import(name, globals, locals, fromlist, level)

builtins.__import__ = interrupted
from numpy_gpt2.__main__ import main
sys.exit(main())
"""


@pytest.mark.parametrize("module", ["numpy", "cli"])
def test_ctrl_c_while_importing_is_one_line(env, module):
    """NumPy loads in the first second of every run, before the command line itself: one line then too."""
    result = _run(env, command=(sys.executable, "-c", _INTERRUPTED_IMPORT.format(module=module)))
    assert (result.returncode, result.stderr, result.stdout) == (130, "numpy-gpt2: interrupted\n", "")


def test_importing_the_package_loads_neither_numpy_nor_numba(env):
    code = "import sys, numpy_gpt2; print(sorted({'numpy', 'numba'} & set(sys.modules)), numpy_gpt2.GPT2.__name__)"
    assert _ok(_run(env, command=(sys.executable, "-c", code))) == "[] GPT2\n"


def test_console_script_entry_point_is_the_guarded_main():
    setup = (REPO / "setup.cfg").read_text()
    assert re.search(r"^\s*numpy-gpt2 = numpy_gpt2\.__main__:main$", setup, re.M), setup


def _run_on_a_terminal(env, *args):
    """Run with stderr on a pseudo-terminal; -> (exit status, what stderr showed)."""
    import pty

    controller, terminal = pty.openpty()
    try:
        result = subprocess.run([sys.executable, "-m", "numpy_gpt2", *map(str, args)], cwd=REPO, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=terminal,
                                timeout=TIMEOUT)
    finally:
        os.close(terminal)
    shown = b""
    try:
        while chunk := os.read(controller, 4096):
            shown += chunk
    except OSError:  # EIO once the terminal side is closed and drained
        pass
    os.close(controller)
    return result.returncode, shown.decode()


def test_first_run_says_it_compiles(tiny_ref, env, tmp_path):
    """With an empty Numba cache the first run says why it is slow, once; the next run does not.

    And it compiles only what it runs: a five-token prompt goes through the decoding step's
    block (`kernels.decode_block`), so none of the prompt path's loops (`attention`, `products`)
    is compiled, and of the two GELU loops only float32's."""
    env = {**env, "NUMBA_CACHE_DIR": str(tmp_path)}
    args = ("generate", PROMPT, "--model", tiny_ref.hub_dir, "--max-new-tokens", 2, "--greedy")
    assert _run_on_a_terminal(env, *args) == (0, "numpy-gpt2: compiling kernels, first run only\r\n")
    # Numba names each cached function's index file MODULE.FUNCTION-LINE.pyXY.nbi.
    compiled = {p.name.split("-")[0] for p in tmp_path.rglob("*.nbi")}
    assert "decode._decode_block" in compiled
    assert not {name for name in compiled if name.startswith(("attention.", "products."))}, compiled
    assert "elementwise.bias_gelu_rows" not in compiled, compiled
    assert _run_on_a_terminal(env, *args) == (0, "")


def test_console_script(env):
    script = shutil.which("numpy-gpt2")
    if script is None:
        pytest.skip("the numpy-gpt2 console script is not installed (pip install -e . puts it on PATH)")
    assert _ok(_run(env, "tokenize", "--ids-only", "Hello world", command=(script,))) == "15496 995\n"
