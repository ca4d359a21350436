"""The pictures: attention heat maps and per-token log-probability bars, from the API and the CLI.

The CLI is run as a user runs it (a subprocess of `python -m numpy_gpt2`, as test_cli does), and
in this process where the figure it draws is compared with transformers.

References trusted here: transformers (`output_attentions` of the tiny reference checkpoint, eager
attention; `torch.log_softmax` of its logits for the log-probabilities), the PNG signature and
matplotlib's own reader (`matplotlib.image.imread`) for the files, and hand-written labels for
how pieces are shown. The drawn values are read back from the Figure the code builds
(`AxesImage.get_array`, `Rectangle.get_height`), so a test sees what is drawn, not what was
meant to be. Tolerances: `conftest.tolerance`, the project's one rule (1e-4 x max(1, max |x|) in
float32, 1e-9 in float64). Measured on the tiny reference: attention weights differ from
transformers' by 3.3e-7 in float32 and 7e-16 in float64, the log-probabilities (up to 8.3 in
size) by 9.2e-7 and 1.8e-15, so a wrong layer, head, token or sign is far outside them.
"""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import tolerance
from numpy_gpt2 import GPT2, GPT2Error, cli, plots, threads
from numpy_gpt2.tokenizer import Tokenizer
from test_cli import _ok, _run, _run_on_a_terminal, env  # noqa: F401  (env: the fixture of the CLI's environment)

matplotlib_image = pytest.importorskip("matplotlib.image")

REPO = pathlib.Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Eleven GPT-2 tokens, all below 1000, the tiny reference's vocabulary size; one is a newline.
TEXT = "I am a man and\nI am a man."
LABELS = ["I", "␣am", "␣a", "␣man", "␣and", "↵", "I", "␣am", "␣a", "␣man", "."]


def _torch_attentions(ref, ids, dtype):
    """transformers' output_attentions: n_layer arrays [H, T, T] for one text."""
    import torch

    model = ref.torch_model.to(getattr(torch, dtype))
    try:
        with torch.no_grad():
            out = model(torch.as_tensor(np.asarray([ids])), output_attentions=True)
    finally:
        ref.torch_model.float()
    return [a[0].numpy() for a in out.attentions]


def _torch_logprobs(ref, ids, dtype="float32"):
    """log p(ids[i+1] | ids[:i+1]) from transformers' logits and torch.log_softmax: [N-1]."""
    import torch

    logits = torch.as_tensor(ref.logits([ids], dtype=dtype)[0, :-1]).double()
    return torch.log_softmax(logits, dim=-1)[torch.arange(len(ids) - 1), torch.as_tensor(ids[1:])].numpy()


def _images(figure):
    """The heat maps of a figure, in the order of its panels."""
    return [image for axes in figure.axes for image in axes.images]


def _check_heat_map(image, expected, reference, dtype):
    """One drawn heat map: the model's weights below the diagonal, blank (masked) above it."""
    drawn = image.get_array()
    T = expected.shape[0]
    assert drawn.shape == (T, T)
    np.testing.assert_array_equal(np.ma.getmaskarray(drawn), np.triu(np.ones((T, T), bool), k=1))
    seen = ~np.ma.getmaskarray(drawn)
    np.testing.assert_array_equal(drawn.data[seen], expected[seen])
    np.testing.assert_allclose(drawn.data[seen], reference[seen], rtol=0, atol=tolerance(reference, dtype))
    assert image.get_clim() == (0, 1)


@pytest.fixture(scope="module")
def ids():
    ids = Tokenizer.default().encode(TEXT)
    assert len(ids) == 11 and max(ids) < 1000
    return ids


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layer, head", [(0, 0), (2, 1)])
def test_one_head_draws_the_models_weights(tiny_ref, ids, dtype, layer, head):
    weights = GPT2.from_pretrained(tiny_ref.hub_dir, dtype=dtype).trace(np.array(ids)).attentions[layer][0]
    reference = _torch_attentions(tiny_ref, ids, dtype)[layer][head]
    figure = plots._attention_figure(weights, Tokenizer.default().pieces(ids), layer, head)
    (image,) = _images(figure)
    _check_heat_map(image, weights[head], reference, dtype)
    assert image.axes.get_title() == f"Attention weights: layer {layer}, head {head}"
    assert "query" in image.axes.get_ylabel() and "key" in image.axes.get_xlabel()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_all_heads_as_a_grid(tiny_ref, ids, dtype):
    weights = GPT2.from_pretrained(tiny_ref.hub_dir, dtype=dtype).trace(np.array(ids)).attentions[1][0]
    reference = _torch_attentions(tiny_ref, ids, dtype)[1]
    figure = plots._attention_figure(weights, Tokenizer.default().pieces(ids), 1, None)
    images = _images(figure)
    assert len(images) == tiny_ref.config["n_head"] == 3
    for h, image in enumerate(images):
        assert image.axes.get_title() == f"head {h}"
        _check_heat_map(image, weights[h], reference[h], dtype)
    assert "layer 1" in figure.get_suptitle()


def test_pieces_label_both_axes(ids):
    T = len(ids)
    weights = np.tril(np.ones((1, T, T))) / np.arange(1, T + 1)[:, None]
    figure = plots._attention_figure(weights, Tokenizer.default().pieces(ids), 0, 0)
    axes = figure.axes[0]
    assert [t.get_text() for t in axes.get_yticklabels()] == LABELS
    assert [t.get_text() for t in axes.get_xticklabels()] == LABELS


def test_bars_are_the_logprobs_given(tiny_ref, ids):
    logprobs = _torch_logprobs(tiny_ref, ids)
    figure = plots._logprobs_figure(Tokenizer.default().pieces(ids[1:]), logprobs)
    (axes,) = figure.axes
    bars = axes.patches
    assert len(bars) == len(ids) - 1
    np.testing.assert_array_equal([bar.get_height() for bar in bars], logprobs)
    np.testing.assert_array_equal([bar.get_x() + bar.get_width() / 2 for bar in bars], np.arange(len(ids) - 1))
    assert [t.get_text() for t in axes.get_xticklabels()] == LABELS[1:]
    assert f"perplexity {np.exp(-logprobs.mean()):.4g}" in axes.get_title()


@pytest.mark.parametrize("piece, shown", [
    (" the", "␣the"), ("\n\n", "↵↵"), ("\t}", "⇥}"), ("\r\n", "␍↵"), ("naïve", "naïve"), ("日本", "日本"),
    ("\x00\x1b", "\\x00\\x1b"), ("\ud800", "\\ud800"), ("\u200b", "\\u200b"), ("\xa0\u2028", "\\xa0\\u2028"), ("", "∅"), ("$x$", "$x$"),
    ("-" * 40, "-" * 15 + "…"),
])
def test_display_piece(piece, shown):
    assert plots.display_piece(piece) == shown


def test_any_unicode_is_drawn_without_error_or_warning(tmp_path, recwarn):
    """Pieces that trip matplotlib up when passed as they are: "$...$" is mathtext (and "$^$"
    a parse error), a lone surrogate cannot be encoded, glyphs the fonts lack warn."""
    pieces = ["$x$", "$\\", "\\$", "$^$", "\ud800", "日本語", "🎉", "\u202e", "\x7f", "ab\u0301", "^_{}", "%s", ""]
    N = len(pieces)
    plots.plot_token_logprobs(pieces, -np.arange(1.0, N + 1), tmp_path / "bars.png")
    plots.plot_attention(np.tril(np.ones((2, N, N))) / np.arange(1, N + 1)[:, None], pieces, tmp_path / "att.png", 0, None)
    assert [t.get_text() for t in plots._logprobs_figure(pieces, -np.arange(1.0, N + 1)).axes[0].get_xticklabels()][:3] \
        == ["$x$", "$\\", "\\$"]
    assert not recwarn.list, [str(w.message) for w in recwarn.list]
    for name in ("bars.png", "att.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_SIGNATURE


def _png_size(path):
    image = matplotlib_image.imread(path)
    return image.shape[1], image.shape[0]


def test_files_are_pngs_of_the_figures_size(tiny_ref, ids, tmp_path):
    weights = GPT2.from_pretrained(tiny_ref.hub_dir).trace(np.array(ids)).attentions[0][0]
    pieces = Tokenizer.default().pieces(ids)
    for head in (2, None):
        path = tmp_path / f"attention-{head}.png"
        plots.plot_attention(weights, pieces, path, 0, head)
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        width, height = plots._attention_figure(weights, pieces, 0, head).get_size_inches() * 100
        assert _png_size(path) == (round(width), round(height))
    path = tmp_path / "logprobs.png"
    plots.plot_token_logprobs(pieces[1:], -np.ones(len(ids) - 1), path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert _png_size(path) == (600, 450)  # the narrowest figure: 6 x 4.5 inches at 100 dpi


@pytest.mark.parametrize("N, width", [(10, 600), (129, 2988), (273, 3000), (1023, 3000)])
def test_long_texts_widen_the_bars_up_to_a_cap(tmp_path, N, width):
    """0.22 inch a bar plus 1.5 of margin, between 6 and 30 inches (100 dpi). Labels are at least
    a line (1.25 x their size) apart, and as close as that allows: all of them while they fit."""
    path = tmp_path / "bars.png"
    pieces = [f"t{i}" for i in range(N)]
    plots.plot_token_logprobs(pieces, -np.ones(N), path)
    assert _png_size(path) == (width, 450)
    labels = plots._logprobs_figure(pieces, -np.ones(N)).axes[0].get_xticklabels()
    spacing = (width / 100 - 1.5) / N * 72  # points between two bars
    step = int(labels[1].get_position()[0] - labels[0].get_position()[0])
    line = labels[0].get_fontsize() * 1.25
    assert step * spacing >= line and (step == 1 or (step - 1) * spacing < line)
    assert len(labels) == len(range(0, N, step)) and (step == 1) == (N <= 273)


def test_missing_matplotlib_is_an_error_naming_the_install(monkeypatch, tmp_path):
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib...` now raises ImportError
    path = tmp_path / "old.png"
    path.write_bytes(b"the old picture")
    with pytest.raises(GPT2Error, match=r"plot_token_logprobs needs matplotlib: pip install matplotlib"):
        plots.plot_token_logprobs(["a", "b"], np.array([-1.0, -2.0]), path)
    with pytest.raises(GPT2Error, match=r"plot_attention needs matplotlib: pip install matplotlib"):
        plots.plot_attention(np.ones((1, 1, 1)), ["a"], path, 0, 0)
    assert path.read_bytes() == b"the old picture"
    assert os.listdir(tmp_path) == ["old.png"]


def test_a_failed_write_leaves_the_old_file(monkeypatch, tmp_path):
    from matplotlib.figure import Figure

    def fail_half_way(self, fname, **kwargs):
        pathlib.Path(fname).write_bytes(PNG_SIGNATURE)
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", fail_half_way)
    path = tmp_path / "old.png"
    path.write_bytes(b"the old picture")
    with pytest.raises(OSError, match="disk full"):
        plots.plot_token_logprobs(["a"], np.array([-1.0]), path)
    assert path.read_bytes() == b"the old picture"
    assert os.listdir(tmp_path) == ["old.png"]


def test_drawing_leaves_pyplot_and_the_backend_alone(tmp_path):
    """A fresh process whose backend is set to something other than Agg keeps it, and pyplot
    (the one place a global backend and figure list live) is never imported."""
    code = (
        "import sys, matplotlib, numpy as np\n"
        "matplotlib.use('svg')\n"
        "from numpy_gpt2 import plots\n"
        f"plots.plot_token_logprobs(['a', 'b'], np.array([-1.0, -2.0]), {str(tmp_path / 'a.png')!r})\n"
        f"plots.plot_attention(np.ones((2, 1, 1)), ['a'], {str(tmp_path / 'b.png')!r}, 0, None)\n"
        "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "svg False\n"


@pytest.mark.parametrize("call, message", [
    (lambda p: plots.plot_attention(np.ones((2, 3, 3)), ["a", "b"], p, 0, 0),
     r"weights must have shape \(H, T, T\) with T = 2 pieces, found \(2, 3, 3\)"),
    (lambda p: plots.plot_attention(np.ones((2, 2, 2)), ["a", "b"], p, 0, 2),
     r"head 2 is out of range: the weights have 2 heads \(0 to 1\)"),
    (lambda p: plots.plot_attention(np.ones((2, 2, 2)), ["a", "b"], p.with_suffix(".jpg"), 0, 0),
     r"plot_attention path: .*out\.jpg does not end in \.png"),
    (lambda p: plots.plot_token_logprobs(["a"], np.ones(1), p.parent / "nowhere" / "out.png"),
     r"plot_token_logprobs path: the directory .*nowhere does not exist"),
    (lambda p: plots.plot_token_logprobs(["a", "b"], np.ones(3), p),
     r"logprobs must have shape \(N,\) for the N = 2 pieces, found \(3,\)"),
    (lambda p: plots.plot_token_logprobs([], np.ones(0), p), r"no token to draw \(a text of 0 or 1 token scores none\)"),
    (lambda p: plots.plot_token_logprobs(["a", "b"], np.array([-1, np.nan]), p), r"logprobs must be finite, found nan"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, call, message):
    with pytest.raises(GPT2Error, match=message):
        call(tmp_path / "out.png")
    assert os.listdir(tmp_path) == []


# ---- the attention command --------------------------------------------------------------------

def test_attention_command_writes_the_png(tiny_ref, ids, env, tmp_path):
    out = tmp_path / "layer2-head1.png"
    stdout = _ok(_run(env, "attention", TEXT, "--layer", 2, "--head", 1, "--out", out, "--model", tiny_ref.hub_dir))
    assert stdout == f"{out}: attention weights of layer 2, head 1, over 11 tokens\n"
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    weights = GPT2.from_pretrained(tiny_ref.hub_dir).trace(np.array(ids)).attentions[2][0]
    width, height = plots._attention_figure(weights, Tokenizer.default().pieces(ids), 2, 1).get_size_inches() * 100
    assert _png_size(out) == (round(width), round(height))


def test_attention_command_reads_stdin_and_draws_all_heads(tiny_ref, env, tmp_path):
    out = tmp_path / "grid.png"
    stdout = _ok(_run(env, "attention", "--layer", 0, "--out", out, "--model", tiny_ref.hub_dir, input=TEXT + "\n"))
    assert stdout == f"{out}: attention weights of layer 0, all 3 heads, over 11 tokens\n"
    assert out.read_bytes()[:8] == PNG_SIGNATURE and matplotlib_image.imread(out).ndim == 3


def test_attention_command_compiles_nothing_and_says_nothing_of_it(tiny_ref, env, tmp_path):
    """It draws from `trace` (plain NumPy): with an empty Numba cache, on a terminal, no
    "compiling kernels" line, and nothing compiled."""
    env = {**env, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    args = ("attention", TEXT, "--layer", 0, "--out", tmp_path / "a.png", "--model", tiny_ref.hub_dir)
    assert _run_on_a_terminal(env, *args) == (0, "")
    assert not list(tmp_path.rglob("*.nbi"))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_attention_command_draws_transformers_weights(tiny_ref, ids, monkeypatch, tmp_path, dtype):
    """The command in this process, its figure caught on the way to the file: the layer, the
    heads, the tokens and the dtype it draws are transformers' for the same text."""
    drawn = []
    save_png = plots.save_png
    monkeypatch.setattr(plots, "save_png", lambda figure, path: (drawn.append(figure), save_png(figure, path)))
    monkeypatch.setattr(threads, "choose_blas_kernels", lambda: None)  # pytest's BLAS stays as it is
    out = tmp_path / "grid.png"
    assert cli.main(["attention", TEXT, "--layer", "2", "--out", str(out), "--model", str(tiny_ref.hub_dir),
                     "--dtype", dtype]) == 0
    (figure,) = drawn
    reference = _torch_attentions(tiny_ref, ids, dtype)[2]
    images = _images(figure)
    assert len(images) == 3
    for h, image in enumerate(images):
        assert image.get_array().dtype == np.dtype(dtype)
        _check_heat_map(image, np.ma.getdata(image.get_array()), reference[h], dtype)
    assert [t.get_text() for t in images[0].axes.get_yticklabels()] == LABELS
    assert out.read_bytes()[:8] == PNG_SIGNATURE


ATTENTION_ERRORS = {
    "layer out of range": (["--layer", "3"], r"--layer 3 is out of range: the model has 3 layers, --layer 0 to 2$"),
    "head out of range": (["--layer", "0", "--head", "3"],
                          r"--head 3 is out of range: the model has 3 heads per layer, --head 0 to 2$"),
    "negative layer": (["--layer", "-1"], r"argument --layer: must be an integer >= 0, found -1$"),
    "no layer": ([], r"the following arguments are required: --layer$"),
    "not a .png": (["--layer", "0", "--out", "{tmp}/a.jpg"], r"--out: {tmp}/a\.jpg does not end in \.png"),
    "no such directory": (["--layer", "0", "--out", "{tmp}/nowhere/a.png"],
                          r"--out: the directory {tmp}/nowhere does not exist$"),
    "text too long": (["--layer", "0", "--text", " ".join([TEXT] * 4)],
                      r"the text is 44 tokens, more than the model's context of n_positions=40; "
                      r"shorten it to at most 40 tokens$"),
    "token outside vocab": (["--layer", "0", "--text", "Hello world"],
                            r"the text has token 15496, outside the model's vocabulary of 1000$"),
    "empty text": (["--layer", "0", "--text", ""], r"the text is empty$"),
}


@pytest.mark.parametrize("case", list(ATTENTION_ERRORS))
def test_attention_command_errors_are_one_line(case, tiny_ref, env, tmp_path):
    """Non-zero exit, one stderr line naming the flag, nothing on stdout, no file written."""
    args, pattern = ATTENTION_ERRORS[case]
    args = [a.format(tmp=tmp_path) for a in args]
    text = TEXT
    if "--text" in args:
        text = args.pop(args.index("--text") + 1)
        args.remove("--text")
    if "--out" not in args:
        args += ["--out", str(tmp_path / "a.png")]
    result = _run(env, "attention", text, *args, "--model", tiny_ref.hub_dir)
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.search(pattern.format(tmp=re.escape(str(tmp_path))), result.stderr.strip()), result.stderr
    assert os.listdir(tmp_path) == []


# ---- score --plot -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_score_plot_draws_transformers_logprobs(tiny_ref, ids, monkeypatch, tmp_path, capsys, dtype):
    """`score TEXT --plot` in this process, its figure caught on the way to the file: one bar per
    scored token, of the height torch.log_softmax gives transformers' logits; the pieces below."""
    drawn = []
    save_png = plots.save_png
    monkeypatch.setattr(plots, "save_png", lambda figure, path: (drawn.append(figure), save_png(figure, path)))
    monkeypatch.setattr(threads, "choose_blas_kernels", lambda: None)  # pytest's BLAS stays as it is
    out = tmp_path / "logprobs.png"
    assert cli.main(["score", TEXT, "--plot", str(out), "--model", str(tiny_ref.hub_dir), "--dtype", dtype]) == 0
    (figure,) = drawn
    (axes,) = figure.axes
    reference = _torch_logprobs(tiny_ref, ids, dtype)
    heights = np.array([bar.get_height() for bar in axes.patches])
    assert heights.shape == (len(ids) - 1,)
    np.testing.assert_allclose(heights, reference, rtol=0, atol=tolerance(reference, dtype))
    assert [t.get_text() for t in axes.get_xticklabels()] == LABELS[1:]
    assert "perplexity" in capsys.readouterr().out
    assert out.read_bytes()[:8] == PNG_SIGNATURE and _png_size(out) == (600, 450)


def test_score_plot_writes_the_png(tiny_ref, env, tmp_path):
    out = tmp_path / "logprobs.png"
    stdout = _ok(_run(env, "score", TEXT, "--plot", out, "--model", tiny_ref.hub_dir))
    assert stdout.startswith("tokens ") and "perplexity" in stdout
    assert out.read_bytes()[:8] == PNG_SIGNATURE and _png_size(out) == (600, 450)


@pytest.mark.parametrize("text, out, pattern", [
    (TEXT, "{tmp}/a.jpg", r"--plot: {tmp}/a\.jpg does not end in \.png"),
    (TEXT, "{tmp}/nowhere/a.png", r"--plot: the directory {tmp}/nowhere does not exist$"),
    ("I", "{tmp}/a.png", r"--plot: the text is 1 token, so no token is scored and there is nothing to draw$"),
])
def test_score_plot_errors_are_one_line(tiny_ref, env, tmp_path, text, out, pattern):
    result = _run(env, "score", text, "--plot", out.format(tmp=tmp_path), "--model", tiny_ref.hub_dir)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.search(pattern.format(tmp=re.escape(str(tmp_path))), result.stderr.strip()), result.stderr
    assert os.listdir(tmp_path) == []


HIDE_MATPLOTLIB = ("import sys; sys.modules['matplotlib'] = None; "  # `import matplotlib` now raises ImportError
                   "from numpy_gpt2.cli import main; sys.exit(main(sys.argv[1:]))")


@pytest.mark.parametrize("args, message", [
    (["attention", TEXT, "--layer", "0", "--out", "{tmp}/a.png"], "numpy-gpt2 attention needs matplotlib"),
    (["score", TEXT, "--plot", "{tmp}/a.png"], "--plot needs matplotlib"),
])
def test_without_matplotlib_the_commands_refuse_before_the_work(tiny_ref, env, tmp_path, args, message):
    """Nothing scored or printed, one line saying what to install, no file."""
    args = [a.format(tmp=tmp_path) for a in args]
    result = _run(env, *args, "--model", tiny_ref.hub_dir, command=(sys.executable, "-c", HIDE_MATPLOTLIB))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"numpy-gpt2: error: {message}: pip install matplotlib\n"
    assert os.listdir(tmp_path) == []
