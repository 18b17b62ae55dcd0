import os

# The Triton interpreter must be chosen before triton is first imported (docs/design.md §12.1). On
# a GPU machine, `VMAMBA_GPU_TESTS=1 python -m pytest tests/test_gpu.py` runs the real kernels
# instead (the interpreter-only tests then skip themselves).
if os.environ.get("VMAMBA_GPU_TESTS", "0") in ("", "0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"

# Argument order of every selective scan: the tensors a backward differentiates.
SCAN_INPUTS = ("u", "delta", "A", "B", "C", "D", "delta_bias")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


def load_golden(fixtures_dir: Path = FIXTURES):
    """The official golden fixture (docs/design.md §11): a freshly built model with its weights loaded
    strictly, and the fixture's tensors (``input``, logits, features, ...)."""
    import json

    from safetensors import safe_open

    from vmamba_cli.model import from_official_config
    from vmamba_cli.weights import checkpoint_filter_fn

    with safe_open(str(fixtures_dir / "vmamba_v2_small_ref.safetensors"), "pt") as f:
        config = json.loads(f.metadata()["config"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model = from_official_config(config).eval()
    model.load_state_dict(checkpoint_filter_fn(tensors), strict=True)
    return model, tensors


# ------------------------------------------------------------------------------------------------
# Shared helpers of the kernel tests (imported as `from conftest import ...`)
# ------------------------------------------------------------------------------------------------

def make_scan_inputs(batch, groups, per_group, d_state, length, dtype=torch.float32, seed=0, device="cpu",
                     spikes=3, wide_delta=False):
    """Scan inputs in the value ranges VMamba feeds the scan (A = -exp(A_log), softplus'd small steps).

    ``spikes``: about that many pre-activations per row lifted above softplus' threshold of 20
    (identity branch, gradient 1); ``wide_delta``: delta spread over +-40 instead, so both softplus
    tails are exercised everywhere. u, delta, B and C come in ``dtype``; A, D, delta_bias in float32.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    channels = groups * per_group

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    inputs = {
        "u": randn(batch, channels, length),
        "delta": randn(batch, channels, length) * 0.5 - 1.0,
        "A": -torch.exp(randn(channels, d_state) * 0.5),
        "B": randn(batch, groups, d_state, length),
        "C": randn(batch, groups, d_state, length),
        "D": randn(channels),
        "delta_bias": randn(channels) * 0.5,
    }
    if wide_delta:
        inputs["delta"] = inputs["delta"] * 24.0
    elif spikes and length:
        inputs["delta"][..., :: max(1, length // spikes)] += 22.0
    for name in ("u", "delta", "B", "C"):
        inputs[name] = inputs[name].to(dtype)
    return inputs


def ss2d_params(d_inner, d_state, rank, seed=0, device="cpu"):
    """Parameters of one SS2D core (four routes) for x of d_inner channels."""
    gen = torch.Generator(device=device).manual_seed(seed)
    k = 4

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    return {
        "x_proj_weight": randn(k, rank + 2 * d_state, d_inner) * 0.5,
        "dt_projs_weight": randn(k, d_inner, rank) * 0.5,
        "dt_projs_bias": randn(k, d_inner) * 0.5,
        "A_logs": randn(k * d_inner, d_state) * 0.3,
        "Ds": randn(k * d_inner),
    }


def run_scan(fn, inputs, dout, **kwargs):
    """y and the gradients of sum(y * dout) with respect to every input (None for absent ones)."""
    leaves = {k: v.detach().clone().requires_grad_(True) if v is not None else None for k, v in inputs.items()}
    y = fn(*(leaves[k] for k in SCAN_INPUTS), **kwargs)
    (y.float() * dout).sum().backward()
    return y.detach(), {k: (v.grad if v is not None else None) for k, v in leaves.items()}


def grads_of(fn, inputs, upstream):
    """fn(**inputs) and its gradients (by input name) for the upstream gradient ``upstream``."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}
    out = fn(**leaves, **{k: None for k, v in inputs.items() if v is None})
    names = list(leaves)
    grads = torch.autograd.grad(out, [leaves[k] for k in names], upstream)
    return out.detach(), dict(zip(names, grads))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| over max |expected| (the golden fixtures' tolerance convention)."""
    scale = expected.abs().max().clamp_min(1e-12)
    return ((actual.float() - expected.float()).abs().max() / scale).item()


def assert_close_to_max(actual, expected, rel=1e-5, name=""):
    """max |actual - expected| <= rel * max |expected| (docs/design.md §11), same shapes."""
    assert actual.shape == expected.shape, name
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual.float() - expected.float()).abs().max().item() if expected.numel() else 0.0
    assert err <= rel * max(scale, 1e-6), f"{name}: max error {err:.3g} vs max |ref| {scale:.3g}"
