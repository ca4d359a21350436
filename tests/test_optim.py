"""numpy_gpt2.optim against torch: AdamW, clipping by global norm, and the schedule.

References trusted here: torch.optim.AdamW (foreach=False, torch's single-tensor loop) with
torch.nn.utils.clip_grad_norm_ and torch.optim.lr_scheduler.LambdaLR, run on the same
parameters and gradients in float64; nanoGPT's get_lr, copied below from its train.py; and
learning rates worked out by hand.
"""

import math

import numpy as np
import pytest

from numpy_gpt2.errors import GPT2Error
from numpy_gpt2.optim import AdamW, clip_grad_norm, get_lr

torch = pytest.importorskip("torch")

LR, MIN_LR, WARMUP, DECAY_STEPS = 6e-4, 6e-5, 2, 5
BETAS, EPS, WEIGHT_DECAY = (0.9, 0.95), 1e-8, 0.1
# float64 on both sides: the only differences are the rounding of a few operations per
# element, far below this.
RTOL = 1e-9


def nanogpt_lr(it, learning_rate=LR, min_lr=MIN_LR, warmup_iters=WARMUP, lr_decay_iters=DECAY_STEPS):
    """nanoGPT train.py's get_lr, as published."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


def random_parameters(rng):
    """2-D matrices and embeddings (one stored transposed, as the model keeps its matrices)
    and 1-D biases and layernorm parameters, named as in a checkpoint."""
    params = {
        "wte.weight": rng.standard_normal((40, 12)),
        "h.0.ln_1.weight": 1 + 0.1 * rng.standard_normal(12),
        "h.0.attn.c_attn.weight": np.ascontiguousarray(rng.standard_normal((36, 12))).T,  # [12, 36], F order
        "h.0.attn.c_attn.bias": rng.standard_normal(36),
        "h.0.mlp.c_fc.weight": np.ascontiguousarray(rng.standard_normal((48, 12))).T,  # [12, 48], F order
        "h.0.mlp.c_proj.weight": rng.standard_normal((48, 12)),
        "ln_f.bias": rng.standard_normal(12),
    }
    # One matrix large enough to be updated in several pieces.
    params["wpe.weight"] = rng.standard_normal((300, 250))
    return params


def random_grads(rng, params, scale):
    grads = {name: scale * rng.standard_normal(p.shape) for name, p in params.items()}
    # One F-order matrix's gradient laid out as the matrix is, the other's not (C order).
    grads["h.0.mlp.c_fc.weight"] = np.asfortranarray(grads["h.0.mlp.c_fc.weight"])
    return grads


def run_numpy(params, grad_steps, max_norm, optimizer=None, first_step=0):
    params = {name: p.copy(order="K") for name, p in params.items()}
    optimizer = optimizer or AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    norms = []
    for step, grads in enumerate(grad_steps, start=first_step):
        grads = {name: g.copy(order="K") for name, g in grads.items()}
        norms.append(clip_grad_norm(grads, max_norm))
        optimizer.step(grads, lr=get_lr(step, LR, MIN_LR, WARMUP, DECAY_STEPS))
    return params, norms, optimizer


def run_torch(params, grad_steps, max_norm):
    tensors = {name: torch.nn.Parameter(torch.tensor(p)) for name, p in params.items()}
    groups = [
        {"params": [t for t in tensors.values() if t.dim() >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [t for t in tensors.values() if t.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, foreach=False)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: nanogpt_lr(it) / LR)
    norms = []
    for grads in grad_steps:
        for name, t in tensors.items():
            t.grad = torch.tensor(grads[name])
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(tensors.values()), max_norm)))
        optimizer.step()
        schedule.step()
    return {name: t.detach().numpy() for name, t in tensors.items()}, norms


def assert_close(ours, theirs):
    for name, expected in theirs.items():
        scale = max(1.0, float(np.abs(expected).max()))
        diff = float(np.abs(ours[name] - expected).max())
        assert diff <= RTOL * scale, f"{name}: max |difference| {diff:.3g} > {RTOL} * {scale:.3g}"


@pytest.fixture
def problem():
    rng = np.random.default_rng(0)
    params = random_parameters(rng)
    # Gradient sizes spread around the clipping norm: some steps are clipped, some are not.
    grad_steps = [random_grads(rng, params, scale) for scale in (0.02, 0.002, 0.0047, 0.001, 0.05)]
    return params, grad_steps


def test_adamw_with_clipping_and_schedule_matches_torch(problem):
    params, grad_steps = problem
    max_norm = 1.0
    ours, our_norms, _ = run_numpy(params, grad_steps, max_norm)
    theirs, their_norms = run_torch(params, grad_steps, max_norm)
    assert any(n > max_norm for n in their_norms) and any(n < max_norm for n in their_norms)
    np.testing.assert_allclose(our_norms, their_norms, rtol=RTOL)
    assert_close(ours, theirs)


def test_adamw_without_clipping_matches_torch(problem):
    params, grad_steps = problem
    ours, _, _ = run_numpy(params, grad_steps, None)
    theirs, _ = run_torch(params, grad_steps, math.inf)
    assert_close(ours, theirs)


def test_float32_updates_stay_float32(problem):
    params, grad_steps = problem
    params32 = {name: p.astype(np.float32) for name, p in params.items()}
    grads32 = [{name: g.astype(np.float32) for name, g in grads.items()} for grads in grad_steps]
    ours, _, optimizer = run_numpy(params32, grads32, 1.0)
    assert all(p.dtype == np.float32 for p in ours.values())
    assert all(m.dtype == np.float32 for m in optimizer.state_arrays().values())
    theirs, _ = run_torch(params, grad_steps, 1.0)
    # float32 against float64: the rounding of the parameters and moments, a few ulp of float32.
    for name, expected in theirs.items():
        np.testing.assert_allclose(ours[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)


def test_saved_state_resumes_exactly(problem, tmp_path):
    params, grad_steps = problem
    straight, _, _ = run_numpy(params, grad_steps, 1.0)
    first, _, optimizer = run_numpy(params, grad_steps[:3], 1.0)
    optimizer.save(tmp_path / "optimizer.safetensors")
    restored = AdamW(first, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    restored.load(tmp_path / "optimizer.safetensors")
    assert restored.step_count == 3
    run_numpy(first, grad_steps[3:], 1.0, optimizer=restored, first_step=3)
    for name in straight:
        np.testing.assert_array_equal(restored.params[name], straight[name], err_msg=name)


def test_state_of_another_model_is_refused(problem, tmp_path):
    params, _ = problem
    AdamW(params).save(tmp_path / "optimizer.safetensors")
    other = {**params, "wte.weight": np.zeros((41, 12))}
    with pytest.raises(GPT2Error, match=r"exp_avg.wte.weight is float64 \(40, 12\), expected float64 \(41, 12\)"):
        AdamW(other).load(tmp_path / "optimizer.safetensors")


def test_clip_grad_norm_matches_torch():
    rng = np.random.default_rng(1)
    grads = {"a": rng.standard_normal((7, 5)), "b": rng.standard_normal(3)}
    tensors = [torch.nn.Parameter(torch.zeros(g.shape, dtype=torch.float64)) for g in grads.values()]
    for t, g in zip(tensors, grads.values()):
        t.grad = torch.tensor(g)
    expected = float(torch.nn.utils.clip_grad_norm_(tensors, 0.5))
    assert clip_grad_norm(grads, 0.5) == pytest.approx(expected, rel=RTOL)
    for t, g in zip(tensors, grads.values()):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=RTOL)


@pytest.mark.parametrize("step, expected", [
    (0, 1e-3 / 11),                  # warmup starts at lr / (warmup + 1), not at 0
    (9, 1e-3 * 10 / 11),             # last warmup step
    (10, 1e-3),                      # end of warmup: the peak
    (60, 1e-4 + 0.5 * 9e-4),         # halfway through the decay: cos(pi / 2) = 0
    (110, 1e-4),                     # end of the decay
    (500, 1e-4),                     # after it
])
def test_schedule_by_hand(step, expected):
    assert get_lr(step, 1e-3, 1e-4, 10, 110) == pytest.approx(expected, rel=1e-12)


def test_schedule_matches_torch_lambda_lr():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    reference = lambda it: nanogpt_lr(it, 1e-3, 1e-4, 10, 110)  # noqa: E731
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: reference(it) / 1e-3)
    for step in range(130):
        assert get_lr(step, 1e-3, 1e-4, 10, 110) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)
        optimizer.step()
        schedule.step()
