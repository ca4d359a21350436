"""Pictures of what the model does: attention weights as heat maps, each token's log-probability
as a bar. PNG files, written atomically.

matplotlib (the `plot` extra) is imported inside the functions that draw, and only its object
API is used (a `Figure` with an Agg canvas of its own, never pyplot), so drawing changes no
backend or figure state of the caller's process. The training run's loss.png (`runs.plotter`)
is drawn with the same two helpers, `new_figure` and `save_png`.
"""

import math
import os
import unicodedata
import warnings

import numpy as np

from .errors import GPT2Error
from .fileio import atomic_path

# How a piece's invisible characters are shown, so " the" and "the" differ on an axis.
_VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}
_MAX_PIECE = 16       # characters of a piece shown; a longer one ends in "…"
_DPI = 100
_MAX_INCHES = 30      # the widest figure: 3000 pixels at _DPI
_BAR_INCHES = 0.22    # width per bar: room for a rotated label of 8-point text
_MARGIN_INCHES = 1.5  # the axis label and tick values beside the bars
_CELL_INCHES = 0.22   # one heat map cell, one head alone; less in a grid of heads


def require_matplotlib(what: str) -> None:
    """GPT2Error "{what} needs matplotlib: pip install matplotlib" when it is not installed, so
    that a caller can refuse before the work whose result it would draw."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise GPT2Error(f"{what} needs matplotlib: pip install matplotlib") from None


def new_figure(width: float, height: float, what: str):
    """A matplotlib Figure of width x height inches with an Agg canvas of its own.

    what: the caller named in the GPT2Error raised when matplotlib is not installed.
    """
    require_matplotlib(what)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_png(figure, path) -> None:
    """Write `figure` to `path` as PNG, atomically (the file is whole or as it was)."""
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # A piece in a script the fonts lack is drawn as a box; matplotlib's warning per
        # missing glyph says nothing more.
        warnings.filterwarnings("ignore", message="Glyph .* missing from")
        figure.savefig(tmp, format="png")


def display_piece(piece: str) -> str:
    """A token's text as an axis label: whitespace visible (" " as ␣, newline as ↵, tab as ⇥,
    other spaces as escapes), control and unpaired surrogate characters as escapes; at most
    _MAX_PIECE characters."""
    shown = "".join(map(_show, piece))
    if not shown:
        return "∅"
    return shown if len(shown) <= _MAX_PIECE else shown[:_MAX_PIECE - 1] + "…"


def _show(c: str) -> str:
    if c in _VISIBLE:
        return _VISIBLE[c]
    if c.isspace() or unicodedata.category(c)[0] == "C":
        return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"
    return c


def check_png_path(path, what: str) -> str:
    """`path` as a str, if it ends in .png and its directory exists; else GPT2Error naming `what`
    (the parameter, or the command line's flag)."""
    path = os.fspath(path)
    if not path.lower().endswith(".png"):
        raise GPT2Error(f"{what}: {path} does not end in .png; the picture is written as PNG")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise GPT2Error(f"{what}: the directory {directory} does not exist")
    return path


def _label_axis(axes, axis: str, labels: list, spacing: float) -> None:
    """Put the pieces on an axis whose positions are `spacing` inches apart: all of them in 6 to
    8 point text where they fit, else every k-th, so that no two labels overlap."""
    points = spacing * 72
    fontsize = min(8.0, max(6.0, points / 1.25))
    ticks = range(0, len(labels), max(1, math.ceil(fontsize * 1.25 / points)))
    shown = [labels[i] for i in ticks]
    # parse_math=False: a "$" in a piece is a dollar sign, not the start of a formula.
    if axis == "x":
        axes.set_xticks(ticks, shown, rotation=90, fontsize=fontsize, parse_math=False)
    else:
        axes.set_yticks(ticks, shown, fontsize=fontsize, parse_math=False)


# ---- per-token log-probabilities --------------------------------------------------------------

def plot_token_logprobs(pieces: list, logprobs: np.ndarray, path) -> None:
    """One bar per scored token: x its piece, y its natural-log probability; saved as PNG at `path`.

    pieces: N strings (each scored token's text, as `Tokenizer.pieces` gives it)
    logprobs: [N] finite floats, nats (as `score.Score.logprobs`)
    The figure widens with N, up to 30 inches; when the pieces no longer fit, every k-th is labelled.
    """
    path = check_png_path(path, "plot_token_logprobs path")
    save_png(_logprobs_figure(pieces, logprobs), path)


def _logprobs_figure(pieces, logprobs):
    logprobs = np.asarray(logprobs, dtype=np.float64)
    if logprobs.ndim != 1 or len(pieces) != len(logprobs):
        raise GPT2Error(f"plot_token_logprobs: logprobs must have shape (N,) for the N = {len(pieces)} pieces, "
                        f"found {logprobs.shape}")
    if len(pieces) == 0:
        raise GPT2Error("plot_token_logprobs: no token to draw (a text of 0 or 1 token scores none)")
    if not np.isfinite(logprobs).all():
        raise GPT2Error(f"plot_token_logprobs: logprobs must be finite, found {logprobs[~np.isfinite(logprobs)][0]}")
    N = len(pieces)
    width = min(_MAX_INCHES, max(6.0, _MARGIN_INCHES + _BAR_INCHES * N))
    figure = new_figure(width, 4.5, "plot_token_logprobs")
    from matplotlib import colormaps

    axes = figure.add_subplot()
    positions = np.arange(N)
    # The surprise -logprob colours each bar, on one scale for the whole text.
    colours = colormaps["viridis_r"](-logprobs / max(1e-12, float(-logprobs.min())))
    axes.bar(positions, logprobs, width=0.8, color=colours)
    axes.set_xlim(-0.6, N - 0.4)
    axes.axhline(0, color="black", lw=0.8)
    _label_axis(axes, "x", [display_piece(p) for p in pieces], (width - _MARGIN_INCHES) / N)
    axes.set_xlabel("token")
    axes.set_ylabel("log-probability (nats)")
    axes.grid(axis="y", alpha=0.3)
    axes.set_title(f"Log-probability of each token given the tokens before it\n{N} tokens, "
                   f"mean {logprobs.mean():.3f} nats, perplexity {math.exp(-logprobs.mean()):.4g}")
    return figure


# ---- attention weights ------------------------------------------------------------------------

def plot_attention(weights: np.ndarray, pieces: list, path, layer: int, head: int | None) -> None:
    """The attention weights of one layer as heat maps, saved as PNG at `path`.

    weights: [H, T, T] of one layer, `model.trace(ids).attentions[layer][0]`: row i (a query)
        holds the weights of keys 0..i, which sum to 1
    pieces: T strings, the tokens' texts (both axes)
    layer: the layer's index, for the title; head: one head's heat map, or None for all H as a grid
    The positions a query may not see (keys after it) are left blank; the colour scale is 0..1.
    """
    path = check_png_path(path, "plot_attention path")
    save_png(_attention_figure(weights, pieces, layer, head), path)


def _attention_figure(weights, pieces, layer, head):
    weights = np.asarray(weights)
    T = len(pieces)
    if weights.ndim != 3 or weights.shape[1:] != (T, T):
        raise GPT2Error(f"plot_attention: weights must have shape (H, T, T) with T = {T} pieces, found {weights.shape}")
    if T == 0:
        raise GPT2Error("plot_attention: no token to draw")
    H = weights.shape[0]
    if head is not None and not 0 <= head < H:
        raise GPT2Error(f"plot_attention: head {head} is out of range: the weights have {H} heads (0 to {H - 1})")
    labels = [display_piece(p) for p in pieces]
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    heads = [head] if head is not None else list(range(H))
    cols = math.ceil(math.sqrt(len(heads)))
    rows = math.ceil(len(heads) / cols)
    # One head: cells wide enough for 8-point labels; a grid: smaller cells, labels on its edges.
    cell = _CELL_INCHES if head is not None else _CELL_INCHES / 2
    margin = 2.5  # the labels, the colour bar
    side = min((_MAX_INCHES - margin) / cols, max(2.5 if head is None else 5.0, cell * T))
    figure = new_figure(cols * side + margin, rows * side + margin - 0.5, "plot_attention")
    grid = figure.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    for k, ax in enumerate(grid.flat):
        if k >= len(heads):
            ax.set_visible(False)
            continue
        h = heads[k]
        # 0..1 for every head: the pictures of two heads or two layers compare at a glance.
        image = ax.imshow(np.ma.masked_array(weights[h], mask=future), cmap="viridis", vmin=0, vmax=1,
                          interpolation="nearest")
        ax.set_title(f"head {h}" if head is None else f"Attention weights: layer {layer}, head {h}")
        if k % cols == 0:
            _label_axis(ax, "y", labels, side / T)
        if k + cols >= len(heads):  # no panel below it
            _label_axis(ax, "x", labels, side / T)
            ax.xaxis.set_tick_params(labelbottom=True)
        if head is not None:
            ax.set_ylabel("query (the token attending)")
            ax.set_xlabel("key (the token attended to)")
    if head is None:
        figure.suptitle(f"Attention weights: layer {layer}, all {H} heads (rows: queries, columns: keys)")
    figure.colorbar(image, ax=grid.ravel().tolist(), label="attention weight", shrink=0.8)
    return figure
