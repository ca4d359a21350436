"""The runtime never imports torch or transformers: a child process where both are unimportable
loads a checkpoint and generates.

References trusted here: Python's import system (a `sys.meta_path` finder sees every import
that is attempted, even one a `try: import torch` would swallow) and Hugging Face
transformers' greedy `generate`, run in this (parent) process on the same weights.
"""

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PROMPT_IDS = [40, 716, 257, 582, 290]  # "I am a man and"; GPT-2 ids below the tiny vocab of 1000

CHILD = r"""
import importlib.abc
import json
import sys

BLOCKED = ("torch", "transformers")
attempts = []


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            attempts.append(name)
            raise ImportError(f"{name} is blocked in this test")
        return None


sys.meta_path.insert(0, _Blocker())

import numpy as np

import numpy_gpt2

model = numpy_gpt2.GPT2.from_pretrained(sys.argv[1])
prompt = json.loads(sys.argv[2])
out = model.generate(np.array([prompt]), max_new_tokens=10, eos_token_id=None)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps({"tokens": out[0, len(prompt):].tolist(), "attempts": attempts, "loaded": loaded}))
"""


def test_generate_without_torch(tiny_ref):
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        ids = torch.tensor([PROMPT_IDS])
        out = tiny_ref.torch_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                            max_new_tokens=10, pad_token_id=0)
    expected = out[0, len(PROMPT_IDS):].tolist()

    result = subprocess.run([sys.executable, "-c", CHILD, str(tiny_ref.hub_dir), json.dumps(PROMPT_IDS)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["attempts"] == [], "numpy_gpt2 tried to import " + ", ".join(report["attempts"])
    assert report["loaded"] == []
    assert report["tokens"] == expected
