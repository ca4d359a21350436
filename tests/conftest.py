"""Reference checkpoints for the tests, built once per session with Hugging Face transformers.

Each checkpoint is a `transformers.GPT2LMHeadModel` with random weights (every tensor drawn, not
left at its initialisation, so that biases and layernorm gains matter), saved twice:
`pretrained/` as `save_pretrained` writes it (`transformer.` prefix) and `hub/` in the layout of
the official openai-community/gpt2 `model.safetensors` (no prefix, `h.{i}.attn.bias` mask
buffers). The torch model itself is the reference the tests compare against.

Also built once: the tokenizer references (tiktoken's own gpt2 encoding and transformers'
GPT2Tokenizer, from ../shared/data/gpt2-bpe), and `tolerance`, the agreement every end-to-end
comparison of a model's outputs demands.
"""

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import shutil

import numpy as np
import pytest
import tiktoken.registry

from safetensors.numpy import save_file

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"

TINY = dict(vocab_size=1000, n_positions=40, n_embd=96, n_layer=3, n_head=3, layer_norm_epsilon=1e-3)
# Odd corners of the config: a non-default MLP width, the other tanh-GELU name, per-layer
# attention scaling, and the reordered/upcast attention path.
VARIANTS = {
    "tiny": TINY,
    "tiny-inner": {**TINY, "n_inner": 200, "activation_function": "gelu_pytorch_tanh"},
    "tiny-scaled": {**TINY, "scale_attn_by_inverse_layer_idx": True, "reorder_and_upcast_attn": True},
}
# n_positions over three of the attention's query blocks (kernels/attention.py, 64 queries), so a
# model-level prompt takes the multi-block path; narrow, so it stays fast.
LONG = dict(vocab_size=500, n_positions=200, n_embd=64, n_layer=2, n_head=4)
# ../shared/fixtures/openai-tf-tiny's hparams.json, under config.json's names.
TF_TINY = dict(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4)
GPT2_124M = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
# n_embd, n_layer, n_head of the published checkpoints (the config.json of each hub repo),
# written out here as the reference, not read from numpy_gpt2.config.
PUBLISHED = {
    "gpt2": (768, 12, 12),
    "gpt2-medium": (1024, 24, 16),
    "gpt2-large": (1280, 36, 20),
    "gpt2-xl": (1600, 48, 25),
    "distilgpt2": (768, 6, 12),
}


@dataclasses.dataclass
class Reference:
    """A random GPT-2 in torch and the two directories its weights were saved to."""

    torch_model: object
    pretrained_dir: pathlib.Path
    hub_dir: pathlib.Path
    config: dict

    def logits(self, ids, dtype="float32", **kwargs):
        """Reference logits (B, T, V) from transformers for int ids (B, T); kwargs as tensors."""
        import torch

        model = self.torch_model.to(getattr(torch, dtype))
        kwargs = {k: torch.as_tensor(np.asarray(v)) for k, v in kwargs.items()}
        # transformers' reorder_and_upcast_attn path refuses float64; it only moves where the
        # scale is applied and upcasts fp16 to fp32, so in float64 the plain path is the same maths.
        attentions = [m for m in model.modules() if hasattr(m, "reorder_and_upcast_attn")]
        upcast = [m.reorder_and_upcast_attn for m in attentions]
        if dtype == "float64":
            for m in attentions:
                m.reorder_and_upcast_attn = False
        try:
            with torch.no_grad():
                return model(torch.as_tensor(np.asarray(ids)), **kwargs).logits.numpy()
        finally:
            self.torch_model.float()
            for m, flag in zip(attentions, upcast):
                m.reorder_and_upcast_attn = flag


def _randomize(model, seed):
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                p.copy_((1.0 + 0.1 * noise) if name.endswith("weight") else 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.05 * noise)
            else:
                p.copy_(0.08 * noise)


def _save_hub_layout(model, hf_config, directory):
    """Write `directory/model.safetensors` as the official hub file is laid out."""
    directory.mkdir(parents=True)
    tensors = {}
    for name, tensor in model.transformer.state_dict().items():
        tensors[name] = tensor.detach().numpy().copy()
    P = hf_config.n_positions
    mask = np.tril(np.ones((P, P), dtype=np.float32))[None, None]
    for i in range(hf_config.n_layer):
        tensors[f"h.{i}.attn.bias"] = mask
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config.to_dict()))


def build_reference(config: dict, directory: pathlib.Path, seed: int = 0) -> Reference:
    """A random transformers GPT-2 with `config`, saved in both layouts under `directory`."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.GPT2Config(**config, bos_token_id=None, eos_token_id=None)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    _randomize(model, seed)
    model.save_pretrained(directory / "pretrained")
    _save_hub_layout(model, hf_config, directory / "hub")
    return Reference(model, directory / "pretrained", directory / "hub", config)


@pytest.fixture(scope="session")
def tiny_refs(tmp_path_factory):
    """name -> Reference for each small variant."""
    root = tmp_path_factory.mktemp("tiny")
    return {name: build_reference(cfg, root / name, seed=i) for i, (name, cfg) in enumerate(VARIANTS.items())}


@pytest.fixture(scope="session")
def tiny_ref(tiny_refs):
    """The plain small odd config: 3 layers, 3 heads, n_embd 96, n_positions 40, vocab 1000."""
    return tiny_refs["tiny"]


@pytest.fixture(scope="session")
def long_ref(tmp_path_factory):
    """A random GPT-2 of LONG: prompts of up to 200 positions, 2 layers of width 64."""
    return build_reference(LONG, tmp_path_factory.mktemp("long"), seed=200)


@pytest.fixture(scope="session")
def gpt2_ref(tmp_path_factory):
    """A random GPT-2 with the full 124M shape."""
    return build_reference(GPT2_124M, tmp_path_factory.mktemp("gpt2-124m"), seed=124)


def shared_file(*parts) -> pathlib.Path:
    """A file under ../shared, or skip the test naming the file it wanted."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the project's ../shared folder)")
    return path


# Where ../shared keeps GPT-2's BPE files (encoder.json, vocab.bpe).
GPT2_BPE = ("data", "gpt2-bpe")
# The URLs tiktoken_ext/openai_public.py's gpt2() reads; tiktoken caches each file under sha1(url).
TIKTOKEN_GPT2_FILES = {
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe": "vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json": "encoder.json",
}


@pytest.fixture(scope="session")
def tiktoken_gpt2(tmp_path_factory):
    """tiktoken's own gpt2 Encoding, built by tiktoken from a cache seeded with ../shared/data/gpt2-bpe."""
    sources = {url: shared_file(*GPT2_BPE, name) for url, name in TIKTOKEN_GPT2_FILES.items()}
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    for url, source in sources.items():
        shutil.copyfile(source, cache / hashlib.sha1(url.encode()).hexdigest())
    previous = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    # Drop any gpt2 Encoding built earlier in this process, so this one comes from the cache.
    tiktoken.registry.ENCODINGS.pop("gpt2", None)
    try:
        encoding = tiktoken.get_encoding("gpt2")
    finally:
        if previous is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = previous
    yield encoding
    tiktoken.registry.ENCODINGS.pop("gpt2", None)


@pytest.fixture(scope="session")
def hf_gpt2_tokenizer(tmp_path_factory):
    """Hugging Face's GPT2Tokenizer from ../shared/data/gpt2-bpe saved as vocab.json + merges.txt."""
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("hf-gpt2-tokenizer")
    shutil.copyfile(shared_file(*GPT2_BPE, "encoder.json"), directory / "vocab.json")
    shutil.copyfile(shared_file(*GPT2_BPE, "vocab.bpe"), directory / "merges.txt")
    tokenizer = transformers.GPT2Tokenizer.from_pretrained(directory)
    # transformers 5 silently builds an empty vocabulary from unknown arguments; make sure
    # this reference really holds GPT-2's.
    assert len(tokenizer) == 50257
    return tokenizer


FLOAT32_EPS = float(np.finfo(np.float32).eps)  # u = 2**-23, one float32 rounding of a value near 1


def float32_error_scale(config) -> float:
    """u * sqrt(n_layer * n_embd): the size float32 rounding gives a GPT-2's logits, per unit of logit.

    A sum of n rounded terms carries a relative error of about sqrt(n) * u when the roundings
    are independent (Higham and Mary's probabilistic bound, 2019); each block adds products over
    n_embd and its errors, again independent, add up over n_layer blocks. Measured against
    transformers in float64, the engine's float32 logits err by 0.15-0.38 of this scale at the
    largest (tests/test_tolerance.py gives the numbers per variant and shape).
    `config`: a dict of config.json keys or an object with n_layer and n_embd attributes.
    """
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key)
    return FLOAT32_EPS * math.sqrt(get("n_layer") * get("n_embd"))


def tolerance(reference: np.ndarray, dtype, config=None) -> float:
    """The agreement an end-to-end comparison demands of a model's outputs (logits, hidden
    states, attention weights), written down once.

    float32, `config` given: float32_error_scale(config) x max(1, max |reference|). Against
    transformers run in float32 (so both sides round) the largest difference measured was
    0.27-0.44 of that on the small variants, 0.36 on the 124M shape and 0.21 on the bundled
    model (tiny: 4.6-7.5 u x max |logit| with sqrt(3 x 96) = 17; 124M: 22-35 u x max |logit|
    with sqrt(12 x 768) = 96), so the bound is 2.3x the worst of them. A GELU constant off in its fourth digit in the
    float32 kernel alone (0.04472 for 0.044715) comes out at 1.0-1.3 of it on the small
    variants; tests/test_tolerance.py holds the RMS error to a tighter bound that catches it
    with more room.
    float32, no `config`: 1e-5 x max(1, max |reference|) (84 u), the bound above for shapes up
    to GPT-2 124M, for a caller that does not know the model's shape.
    float64: 1e-9, absolute, on logits of order 1-10: what double precision leaves after the
    same operations (measured: 4e-15 tiny, 1.1e-13 at the 124M shape), with several orders of
    margin.
    """
    if np.dtype(dtype) == np.float64:
        return 1e-9
    scale = max(1.0, float(np.abs(reference).max()))
    if config is None:
        return 1e-5 * scale
    return float32_error_scale(config) * scale


@pytest.fixture(autouse=True)
def _no_hf_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
