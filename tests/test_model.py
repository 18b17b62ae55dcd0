"""Parity of our VSSM with the official code: golden tensors, official key/shape lists, layouts, sizes."""

import json

import pytest
import torch
from safetensors import safe_open

from vmamba_cli.model import (MODELS, VMambaConfig, VSSM, create_model, from_official_config,
                              get_model_spec, resolve_model_name)
from vmamba_cli.weights import checkpoint_filter_fn


@pytest.fixture(scope="module")
def golden(fixtures_dir):
    with safe_open(str(fixtures_dir / "vmamba_v2_small_ref.safetensors"), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return json.loads(meta["config"]), tensors


@pytest.fixture(scope="module")
def golden_model(golden):
    config, tensors = golden
    model = from_official_config(config).eval()
    model.load_state_dict(checkpoint_filter_fn(tensors), strict=True)
    return model


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_golden_logits_and_features(golden, golden_model, backend):
    _, t = golden
    golden_model.set_scan_backend(backend)
    with torch.no_grad():
        features = golden_model.forward_features(t["input"])
        logits = golden_model.forward_head(features[-1])
        whole = golden_model(t["input"])
    golden_model.set_scan_backend("auto")
    assert len(features) == 4
    for i, f in enumerate(features):
        ref = t[f"features.stage{i}"]
        assert f.shape == ref.shape
        assert (f - ref).abs().max().item() <= 1e-4, f"stage {i}"
    assert (logits - t["logits"]).abs().max().item() <= 1e-5
    assert torch.equal(whole, logits)


def test_golden_patch_embed(golden, golden_model):
    _, t = golden
    with torch.no_grad():
        out = golden_model.patch_embed(t["input"])
    assert (out - t["features.patch_embed"]).abs().max().item() <= 1e-4


def test_golden_first_block_intermediates(golden, golden_model):
    """Walk layers.0.blocks.0 by hand and compare every stored intermediate (docs/design.md §11)."""
    _, t = golden
    dbg = {k[len("debug.l0b0."):]: v for k, v in t.items() if k.startswith("debug.l0b0.")}
    block = golden_model.layers[0].blocks[0]
    op = block.op
    close = lambda a, b: torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)  # noqa: E731
    from vmamba_cli import kernels

    with torch.no_grad():
        x = dbg["block_in"]
        normed = block.norm(x)
        close(normed, dbg["norm_out"])
        projected = op.in_proj(normed)
        close(projected, dbg["in_proj_out"])
        conv = op.conv2d(projected)
        close(conv, dbg["dwconv_out"])
        act = torch.nn.functional.silu(conv)
        b, d, h, w = act.shape
        xs = kernels.cross_scan(act)
        close(xs.reshape(b, -1, h * w), dbg["scan.u"])
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, op.x_proj_weight)
        dts, Bs, Cs = torch.split(x_dbl, [op.dt_rank, op.d_state, op.d_state], dim=2)
        close(Bs, dbg["scan.B"])
        close(Cs, dbg["scan.C"])
        delta = torch.einsum("bkrl,kdr->bkdl", dts, op.dt_projs_weight).reshape(b, -1, h * w)
        close(delta, dbg["scan.delta"])
        close(-torch.exp(op.A_logs), dbg["scan.A"])
        close(op.Ds, dbg["scan.D"])
        close(op.dt_projs_bias.reshape(-1), dbg["scan.delta_bias"])
        ys = kernels.selective_scan(dbg["scan.u"], dbg["scan.delta"], dbg["scan.A"], dbg["scan.B"], dbg["scan.C"],
                                    dbg["scan.D"], dbg["scan.delta_bias"], delta_softplus=True)
        close(ys.view(b, 4, d, h, w), dbg["scan.y"])
        merged = kernels.cross_merge(dbg["scan.y"])
        close(merged.reshape(b, d, h * w), dbg["merged_y"])
        close(op.out_norm(merged), dbg["out_norm_out"])
        close(op(normed), dbg["ss2d_out"])
        close(block(x), dbg["block_out"])


@pytest.fixture(scope="module")
def official_keys(fixtures_dir):
    data = json.loads((fixtures_dir / "official_keys.json").read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def test_official_key_lists_cover_released_families(official_keys):
    assert len(official_keys) == 7


@pytest.mark.parametrize("name", ["vmambav0_tiny", "vmambav0_small", "vmambav0_base", "vmambav2_tiny",
                                  "vmambav2_small", "vmambav2_base", "vmambav2v_tiny"])
def test_official_keys_shapes_and_params(official_keys, name):
    entry = official_keys[name]
    with torch.device("meta"):  # shapes only: skip allocating and initialising ~80M parameters
        model = from_official_config(entry["config"])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == entry["state_dict"]
    assert list(ours) == list(entry["state_dict"])  # same order as the official listing
    assert sum(p.numel() for p in model.parameters()) == entry["num_params"]
    # The registry entry with this official name builds the same network, checkpoint included.
    spec = get_model_spec(name)
    assert spec.checkpoint == entry["checkpoint"]
    assert spec.params == entry["num_params"]
    with torch.device("meta"):
        assert {k: list(v.shape) for k, v in VSSM(spec.config).state_dict().items()} == ours


@pytest.mark.parametrize("name", list(MODELS))
def test_registry_param_counts(name):
    """All nine released configs (two have no key list fixture) match the authors' parameter counts."""
    spec = MODELS[name]
    with torch.device("meta"):
        model = VSSM(spec.config)
    assert sum(p.numel() for p in model.parameters()) == spec.params


def test_aliases_and_default():
    assert resolve_model_name("vmamba-tiny") == "vmamba-tiny-s1l8"
    assert resolve_model_name("vmamba_tiny_s1l8") == "vmamba-tiny-s1l8"
    assert resolve_model_name("vmambav2_tiny") == "vmamba-tiny-s2l5"
    assert get_model_spec("vmamba-tiny").config.depths == (2, 2, 8, 2)
    with pytest.raises(KeyError, match="did you mean"):
        resolve_model_name("vmamba-tinny")


def test_from_official_config_rejects_unsupported_variants(golden):
    config, _ = golden
    for key, value in [("forward_type", "v2"), ("forward_type", "m0"), ("norm_layer", "bn"), ("gmlp", True)]:
        with pytest.raises(ValueError, match=key):
            from_official_config({**config, key: value})


def _small(family: str, channels_first: bool) -> VMambaConfig:
    if family == "v0":
        return VMambaConfig(dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), d_state=4, ssm_ratio=2.0,
                            ssm_conv_bias=True, gated=True, mlp_ratio=0.0, num_classes=7,
                            channels_first=channels_first, stem="v1", downsample="v1")
    return VMambaConfig(dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), d_state=1, ssm_ratio=1.0, num_classes=7,
                        channels_first=channels_first)


def _perturbed(cfg: VMambaConfig, seed: int = 0) -> VSSM:
    """Random model whose scan path matters (official init hides scan bugs, spec pitfall 11)."""
    torch.manual_seed(seed)
    model = VSSM(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("dt_projs_bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1 or name.endswith("A_logs"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            elif "in_proj" in name or "out_proj" in name or "x_proj" in name:
                p.mul_(4.0)
    return model


@pytest.mark.parametrize("family", ["v0", "v2"])
def test_layouts_are_interchangeable(family):
    """Channel-first and channel-last builds share keys and give the same logits (docs/design.md §3.1)."""
    first = _perturbed(_small(family, True))
    last = VSSM(_small(family, False)).eval()
    last.load_state_dict(first.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        a, b = first(x), last(x)
        fa, fb = first.forward_features(x), last.forward_features(x)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    for p, q in zip(fa, fb):
        torch.testing.assert_close(p, q, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["v0", "v2"])
@pytest.mark.parametrize("size", [(72, 56), (64, 40), (33, 47)])
def test_arbitrary_input_sizes(family, size):
    model = _perturbed(_small(family, family == "v2"))
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model.forward_head(features[-1])
        model.set_scan_backend("reference")
        reference = model(x)
    h, w = size
    for i, f in enumerate(features):
        # stem and downsamples halve with ceil: total stride 4 then 2 per stage
        if family == "v2":
            eh, ew = -(-h // 4), -(-w // 4)
        else:
            eh, ew = h // 4, w // 4
        for _ in range(i):
            eh, ew = -(-eh // 2), -(-ew // 2)
        assert f.shape[2:] == (eh, ew), f"stage {i}"
    assert logits.shape == (1, 7) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits, reference, atol=2e-5, rtol=1e-4)


def test_patch_merging_order_and_padding():
    """PatchMerging2D gathers phases (0,0), (1,0), (0,1), (1,1) and zero-pads odd sizes at bottom/right."""
    from vmamba_cli.model import PatchMerging2D

    pm = PatchMerging2D(1, 4, channels_first=False)
    with torch.no_grad():
        pm.norm.weight.fill_(1.0)
        pm.norm.bias.zero_()
        pm.reduction.weight.copy_(torch.eye(4))
    captured = {}
    pm.norm.register_forward_hook(lambda m, i, o: captured.setdefault("x", i[0]))
    x = torch.arange(1, 16, dtype=torch.float32).view(1, 3, 5, 1)  # H=3, W=5
    pm(x)
    gathered = captured["x"]
    assert gathered.shape == (1, 2, 3, 4)
    assert gathered[0, 0, 0].tolist() == [1.0, 6.0, 2.0, 7.0]   # (0,0) (1,0) (0,1) (1,1)
    assert gathered[0, 1, 2].tolist() == [15.0, 0.0, 0.0, 0.0]  # padded row and column


def test_drop_path_only_in_training():
    model = VSSM(_small("v2", True), drop_path_rate=0.5)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        a = model(x)
        b = model(x)
    assert not torch.equal(a, b)


def test_official_init_statistics():
    model = create_model("vmamba-tiny", num_classes=10)
    op = model.layers[0].blocks[0].op
    dt = torch.nn.functional.softplus(op.dt_projs_bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    assert torch.equal(op.A_logs, torch.zeros_like(op.A_logs))  # N=1: log(1)
    assert torch.equal(op.Ds, torch.ones_like(op.Ds))
    assert abs(op.in_proj.weight.std().item() - 0.02) < 0.004
    assert model.classifier.head.out_features == 10
    v0 = create_model("vmamba-v0-tiny").layers[0].blocks[0].op
    assert torch.allclose(v0.A_logs[5], torch.log(torch.arange(1, 17, dtype=torch.float32)))


def test_backward_through_model():
    model = _perturbed(_small("v2", True)).train()
    x = torch.randn(2, 3, 40, 32, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values())
    assert grads["layers.0.blocks.0.op.A_logs"].abs().sum() > 0
    assert grads["layers.0.blocks.0.op.dt_projs_bias"].abs().sum() > 0


def test_gelu_on_channels_last_maps():
    from vmamba_cli.model import GELU

    x = torch.randn(2, 6, 5, 4).to(memory_format=torch.channels_last).requires_grad_()
    y = GELU()(x)
    assert y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, torch.nn.functional.gelu(x), rtol=1e-6, atol=1e-6)
    y.sum().backward()
    expected = torch.autograd.grad(torch.nn.functional.gelu(x).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected, rtol=1e-6, atol=1e-6)
    plain = torch.randn(3, 7)
    torch.testing.assert_close(GELU()(plain), torch.nn.functional.gelu(plain))


@pytest.mark.parametrize("family", ["v0", "v2"])
@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_model_converted_to_half_precision(family, dtype, tolerance):
    """model.to(bf16 / fp16) runs on CPU (the scan's float32 output meets a half-precision norm)
    and predicts what the float32 model does, within that precision."""
    model = _perturbed(_small(family, family == "v2"))
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        expected = model(x)
        half = model.to(dtype)
        out = half(x.to(dtype))
    assert out.dtype == dtype
    scale = expected.abs().max()
    assert (out.float() - expected).abs().max() <= tolerance * scale
    model.set_scan_backend("torch")
    with torch.no_grad():
        torch_backend = half(x.to(dtype))
    assert (torch_backend.float() - expected).abs().max() <= tolerance * scale


def test_scan_tuning_reaches_every_ss2d_core(monkeypatch):
    import vmamba_cli.model as model_module

    seen = []

    def core(x, *weights, backend, tuning):  # stands in for the kernel: records what the block passed
        seen.append(tuning)
        return torch.zeros_like(x, dtype=torch.float32)

    monkeypatch.setattr(model_module, "cross_selective_scan", core)
    net = create_model("vmamba-tiny", dims=[8, 16, 24, 32], depths=[1, 1, 1, 1]).eval()
    marker = object()
    with torch.no_grad():
        net.set_scan_tuning(marker)(torch.randn(1, 3, 32, 32))
        assert seen == [marker] * 4
        seen.clear()
        net.set_scan_tuning(None)(torch.randn(1, 3, 32, 32))
    assert seen == [None] * 4
