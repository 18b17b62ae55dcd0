"""Effective receptive field: exact fields of known networks, the area measure, rendering, the CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from vmamba_cli.erf import (AREA_THRESHOLDS, InputSource, VMambaBackbone, average_erf, high_contribution_area,
                            input_gradient_map, load_erf_maps, normalise_erf, panel_specs, prepare_backbone,
                            render_erf, save_erf_maps)


def conv_stack(n_layers: int, channels: int = 3, *, positive: bool, relu: bool = False, strides=None) -> nn.Module:
    """3x3 'same' convolutions; with stride 1 everywhere the field is exactly 1 + 2 * n_layers wide."""
    strides = strides or [1] * n_layers
    layers: list[nn.Module] = []
    for stride in strides:
        conv = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)
        if positive:  # equal weights: the centre is reached by the most paths
            nn.init.constant_(conv.weight, 0.1)
        layers.append(conv)
        if relu:
            layers.append(nn.ReLU())
    return prepare_backbone(nn.Sequential(*layers))


def noise(n: int, size: int, seed: int = 0, positive: bool = False):
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        x = torch.randn(1, 3, size, size, generator=g)
        yield f"noise-{i}", (x.abs() + 0.1 if positive else x)


def field_box(size: int, half_width: int) -> np.ndarray:
    c = size // 2
    inside = np.zeros((size, size), dtype=bool)
    inside[c - half_width:c + half_width + 1, c - half_width:c + half_width + 1] = True
    return inside


# ------------------------------------------------------------------------------------------------
# Maps of networks whose field is known by construction
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_layers", [1, 3, 5])
def test_conv_stack_field_is_exactly_its_receptive_field(n_layers):
    size = 33
    erf = average_erf(conv_stack(n_layers, positive=True, relu=True), noise(2, size, positive=True))
    inside = field_box(size, n_layers)  # RF side = 1 + 2 * n_layers
    assert erf.used == 2 and erf.skipped_nonfinite == 0
    assert np.all(erf.raw[~inside] == 0.0)
    assert np.all(erf.raw[inside] > 0.0)
    if n_layers > 1:  # one layer of equal weights is flat over its 3x3 field
        centre = erf.raw[size // 2, size // 2]
        assert centre == erf.raw.max() and np.count_nonzero(erf.raw == centre) == 1


def test_signed_weights_never_leak_outside_the_field():
    torch.manual_seed(1)
    size, n_layers = 31, 4
    grad_map = input_gradient_map(conv_stack(n_layers, positive=False), torch.randn(1, 3, size, size)).numpy()
    inside = field_box(size, n_layers)
    assert np.all(grad_map[~inside] == 0.0)
    assert np.count_nonzero(grad_map[inside]) > inside.sum() // 2  # ReLU(grad) zeroes some, not most


def tiny_vmamba(dims=(8, 16), depths=(1, 1)):
    from vmamba_cli.model import VMambaConfig, VSSM

    torch.manual_seed(0)
    model = VSSM(VMambaConfig(dims=dims, depths=depths, num_classes=0, drop_path_rate=0.0))
    return prepare_backbone(VMambaBackbone(model.set_scan_backend("torch")))


def test_tiny_vmamba_field_is_global_while_a_cnn_of_its_depth_is_local():
    size = 128
    # The CNN mirrors the tiny VMamba's convolutions: two stride-2 stem convs, the depthwise conv of
    # block 1, the stride-2 downsample, the depthwise conv of block 2 (field 39 px, half-width 19).
    cnn = conv_stack(5, positive=False, relu=True, strides=[2, 2, 1, 2, 1])
    far = ~field_box(size, 32)
    cnn_map = average_erf(cnn, noise(2, size)).raw
    vmamba_map = average_erf(tiny_vmamba(), noise(2, size)).raw
    assert np.all(cnn_map[far] == 0.0)
    assert np.count_nonzero(cnn_map) > 0
    # the four-direction selective scan links every token to the centre
    assert np.count_nonzero(vmamba_map[far]) > 0.8 * far.sum()
    for corner in (vmamba_map[:8, :8], vmamba_map[:8, -8:], vmamba_map[-8:, :8], vmamba_map[-8:, -8:]):
        assert corner.max() > 0.0


def test_four_stage_tiny_vmamba_runs_and_keeps_the_input_shape():
    grad_map = input_gradient_map(tiny_vmamba((8, 16, 32, 64), (1, 1, 1, 1)), torch.randn(1, 3, 64, 64))
    assert grad_map.shape == (64, 64)
    assert torch.isfinite(grad_map).all() and grad_map.max() > 0


class NaNOnBright(nn.Module):
    """Identity-ish backbone that poisons its output (hence the gradient) for bright inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y * torch.nan if x.mean() > 10 else y


def test_nan_maps_are_skipped_counted_and_not_averaged():
    backbone = prepare_backbone(NaNOnBright())
    torch.manual_seed(0)
    good = [torch.randn(1, 3, 16, 16) for _ in range(3)]
    inputs = [("a", good[0]), ("bright", good[1] + 100), ("b", good[2]), ("c", good[1])]
    seen = []
    erf = average_erf(backbone, inputs, num_images=2, on_image=lambda name, ok: seen.append((name, ok)))
    assert (erf.used, erf.skipped_nonfinite, erf.skipped_names) == (2, 1, ["bright"])
    assert seen == [("a", True), ("bright", False), ("b", True)]  # stops once 2 maps are averaged
    expected = (input_gradient_map(backbone, good[0]).double() + input_gradient_map(backbone, good[2]).double()) / 2
    np.testing.assert_allclose(erf.raw, expected.numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match="NaN"):
        average_erf(backbone, [("bright", good[0] + 100)])


# ------------------------------------------------------------------------------------------------
# Normalisation and the high-contribution area
# ------------------------------------------------------------------------------------------------

def test_normalisations():
    np.testing.assert_allclose(normalise_erf(np.array([0.0, 1.0, 32.0]), "pow"), [0.0, 0.5, 1.0])
    np.testing.assert_allclose(normalise_erf(np.array([0.0, 9.0, 99.0]), "log"), [0.0, 0.5, 1.0])
    with pytest.raises(ValueError):
        normalise_erf(np.ones(3), "sqrt")


def replknet_get_rectangle(data, thresh):
    """The loop of RepLKNet's erf/analyze_erf.py, started at i = 0 (the oracle)."""
    h, w = data.shape
    all_sum = np.sum(data)
    for i in range(0, h // 2):
        area_sum = np.sum(data[h // 2 - i:h // 2 + 1 + i, w // 2 - i:w // 2 + 1 + i])
        if area_sum / all_sum > thresh:
            return i * 2 + 1, (i * 2 + 1) / h * (i * 2 + 1) / w
    return None


def test_area_of_a_uniform_square_has_the_known_answer():
    data = np.zeros((21, 21))
    data[8:13, 8:13] = 1.0  # 5x5 block around the centre (10, 10): squares of side 1, 3, 5 hold 1, 9, 25 of 25
    got = {a.threshold: (a.side, a.area_ratio) for a in high_contribution_area(data, (0.03, 0.2, 0.3, 0.36, 0.5, 0.99))}
    assert got[0.03] == (1, 1 / 441)
    assert got[0.2] == got[0.3] == (3, 9 / 441)
    assert got[0.36] == (5, 25 / 441)  # 9/25 = 0.36 exactly is not "more than" 0.36
    assert got[0.5] == got[0.99] == (5, 25 / 441)


def test_area_matches_the_replknet_loop_on_random_maps():
    rng = np.random.default_rng(0)
    for shape in ((64, 64), (33, 33), (40, 40)):
        yy, xx = np.mgrid[:shape[0], :shape[1]]
        data = rng.random(shape) * np.exp(-((yy - shape[0] // 2) ** 2 + (xx - shape[1] // 2) ** 2) / 60.0)
        for area in high_contribution_area(data, AREA_THRESHOLDS):
            expected = replknet_get_rectangle(data, area.threshold)
            assert expected is not None
            assert (area.side, area.area_ratio) == pytest.approx(expected)


def test_area_falls_back_to_the_whole_map_when_no_centred_square_is_enough():
    data = np.zeros((16, 16))
    data[0, :] = 1.0  # even size: the first row lies outside every centred odd square
    assert [(a.side, a.area_ratio) for a in high_contribution_area(data, (0.5,))] == [(16, 1.0)]


# ------------------------------------------------------------------------------------------------
# Rendering and saving
# ------------------------------------------------------------------------------------------------

def test_png_is_written_readable_sized_and_not_blank(tmp_path):
    from PIL import Image

    yy, xx = np.mgrid[:64, :64]
    peaked = normalise_erf(np.exp(-((yy - 32) ** 2 + (xx - 32) ** 2) / 50.0) * 100, "pow")
    flat = normalise_erf(np.ones((64, 64)), "pow") * 0.3
    out = render_erf([("peaked", peaked), ("flat", flat)], tmp_path / "erf.png", panel_inches=3.0, dpi=50)
    assert [p.name for p in tmp_path.iterdir()] == ["erf.png"]  # no temp file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not the 0600 of the temporary file
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == (round((3.0 * 2 + 0.9) * 50), round((3.0 + 0.5) * 50))
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 50
    greens = (pixels[:, 1].astype(int) - pixels[:, 0]) > 60  # RdYlGn's green end marks the peak
    assert greens.sum() > 20


def test_raw_maps_round_trip_npy_and_safetensors(tmp_path):
    maps = [("a (fresh init)", np.arange(16.0).reshape(4, 4)), ("b", np.ones((4, 4)))]
    one = load_erf_maps(save_erf_maps(tmp_path / "one.npy", maps[:1]))
    np.testing.assert_array_equal(one["map"], maps[0][1])
    both = load_erf_maps(save_erf_maps(tmp_path / "both.npy", maps))
    np.testing.assert_array_equal(both["map-1"], maps[1][1])
    named = load_erf_maps(save_erf_maps(tmp_path / "maps.safetensors", maps, {"resolution": 4}))
    assert set(named) == {"a (fresh init)", "b"}
    np.testing.assert_array_equal(named["a (fresh init)"], maps[0][1])
    with pytest.raises(ValueError, match="npy or .safetensors"):
        save_erf_maps(tmp_path / "maps.txt", maps)


def test_panel_specs():
    specs = panel_specs(["vmamba-tiny"], ["w.pth"], before_after=True, compare=["resnet50", "swin_t"])
    assert [(s.kind, s.weights, s.init_like) for s in specs] == [
        ("vmamba", None, "w.pth"), ("vmamba", "w.pth", None), ("torchvision", None, None), ("torchvision", None, None)]
    assert len({s.title for s in specs}) == 4
    assert len({s.title for s in panel_specs(["vmamba-tiny", "vmamba-tiny"])}) == 2
    with pytest.raises(ValueError, match="--weights"):
        panel_specs(["vmamba-tiny"], before_after=True)
    with pytest.raises(ValueError, match="mobilenet_v3_small"):
        panel_specs(["vmamba-tiny"], compare=["mobilenet_v3_small"])
    tagged = panel_specs([], compare=["resnet50:IMAGENET1K_V2", "convnext_tiny:DEFAULT", "swin_t", "vit_b_16:DEFAULT"])
    assert [(s.title, s.weights) for s in tagged[1:]] == [
        ("resnet50 (IMAGENET1K_V2)", "IMAGENET1K_V2"), ("convnext_tiny (IMAGENET1K_V1)", "DEFAULT"),
        ("swin_t (random init)", None), ("vit_b_16 (IMAGENET1K_V1)", "DEFAULT")]
    with pytest.raises(ValueError, match="IMAGENET1K_V1, IMAGENET1K_V2"):
        panel_specs([], compare=["resnet50:IMAGENET1K_V9"])
    with pytest.raises(ValueError, match="unknown torchvision model 'resnet51'"):
        panel_specs([], compare=["resnet51"])


def test_builtin_photos_load_offline_at_the_requested_size():
    source = InputSource("builtin", resolution=48)
    first = [item for _, item in zip(range(2), source.iterate())]
    assert source.available >= 12
    for name, x in first:
        assert x.shape == (1, 3, 48, 48) and x.std() > 0.1


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A small VMamba saved in our format, weights moved off the fresh init."""
    from vmamba_cli.model import VMambaConfig, VSSM
    from vmamba_cli.weights import save_model

    torch.manual_seed(3)
    trained = VSSM(VMambaConfig(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), num_classes=10, drop_path_rate=0.0))
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return save_model(tmp_path_factory.mktemp("weights") / "tiny.safetensors", trained)


def test_cli_json_schema_and_outputs(tmp_path, tiny_weights):
    from PIL import Image
    from typer.testing import CliRunner

    from vmamba_cli.cli import app

    (tmp_path / "imgs").mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(
            tmp_path / "imgs" / f"{i}.png")
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"not a jpeg")

    out, maps = tmp_path / "erf.png", tmp_path / "maps.npy"
    result = CliRunner().invoke(app, [
        "erf", "--weights", str(tiny_weights), "--before-after", "--images", str(tmp_path / "imgs"),
        "--resolution", "64", "--num-images", "5", "--compare", "resnet18", "--out", str(out),
        "--save-map", str(maps), "--norm", "log", "--json"])
    assert result.exit_code == 1, result.output  # the broken file is reported, the rest still processed
    assert "broken.jpg" in result.stderr
    doc = json.loads(result.stdout)
    assert doc["resolution"] == 64 and doc["norm"] == "log" and doc["inputs"] == "folder"
    assert doc["num_images_requested"] == 5 and len(doc["errors"]) == 1
    assert [p["kind"] for p in doc["panels"]] == ["vmamba", "vmamba", "torchvision"]
    raw = np.load(maps)
    assert raw.shape == (3, 64, 64)
    for panel, panel_raw in zip(doc["panels"], raw):
        assert panel["images_used"] == 2 and panel["images_skipped_nan"] == 0
        assert panel["map_shape"] == [64, 64]
        assert [a["threshold"] for a in panel["area"]] == list(AREA_THRESHOLDS)
        recomputed = high_contribution_area(normalise_erf(panel_raw, "log"))
        assert [a["side"] for a in panel["area"]] == [a.side for a in recomputed]
        assert panel["raw_max"] == pytest.approx(float(panel_raw.max()), rel=1e-6)
    assert not np.allclose(raw[0], raw[1])  # trained weights change the map
    with Image.open(out) as im:
        assert im.size[0] > 2 * im.size[1]  # three panels side by side


def test_cli_compare_takes_space_separated_names_and_noise(tmp_path, tiny_weights):
    from typer.testing import CliRunner

    from vmamba_cli.cli import app

    result = CliRunner().invoke(app, ["erf", "--noise", "--resolution", "64", "--num-images", "1",
                                      "--weights", str(tiny_weights), "--out", str(tmp_path / "e.png"),
                                      "--save-map", str(tmp_path / "m.safetensors"), "--json",
                                      "--compare", "resnet18", "resnet18"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [p["model"] for p in doc["panels"]] == ["custom", "resnet18", "resnet18"]
    assert doc["inputs"] == "noise" and doc["errors"] == []
    assert set(load_erf_maps(tmp_path / "m.safetensors")) == {p["title"] for p in doc["panels"]}
    bad = CliRunner().invoke(app, ["erf", "--norm", "sqrt", "--out", str(tmp_path / "x.png")])
    assert bad.exit_code == 1 and "--norm" in bad.stderr and "Traceback" not in bad.output
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------------------------------
# Vision Transformers and released torchvision weights
# ------------------------------------------------------------------------------------------------

def small_vit(num_layers: int, image_size: int = 64, seed: int = 0):
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(image_size=image_size, patch_size=16, num_layers=num_layers, num_heads=2,
                             hidden_dim=32, mlp_dim=64, num_classes=10)


def test_vit_map_is_the_central_patch_token():
    from vmamba_cli.erf import ViTBackbone

    x = torch.randn(1, 3, 64, 64)
    # No encoder layer: the central token of the 4x4 grid, (2, 2), sees exactly its own 16x16 patch
    alone = input_gradient_map(prepare_backbone(ViTBackbone(small_vit(0))), x).numpy()
    inside = np.zeros((64, 64), dtype=bool)
    inside[32:48, 32:48] = True
    assert np.all(alone[~inside] == 0.0) and np.count_nonzero(alone[inside]) > 0.3 * inside.sum()
    # One layer of global attention reaches every patch, the corners too
    attended = input_gradient_map(prepare_backbone(ViTBackbone(small_vit(1))), x).numpy()
    for corner in (attended[:16, :16], attended[:16, -16:], attended[-16:, :16], attended[-16:, -16:]):
        assert corner.max() > 0.0
    backbone = prepare_backbone(ViTBackbone(small_vit(2)))
    assert backbone(x).shape == (1, 32, 4, 4)  # class token dropped, NCHW grid


def test_vit_state_dict_is_interpolated_to_another_size_as_torchvision_does():
    from torchvision.models.vision_transformer import interpolate_embeddings

    from vmamba_cli.peers import load_vit_state_dict

    state = small_vit(1, image_size=64, seed=1).state_dict()
    model = load_vit_state_dict(small_vit(1, image_size=96, seed=2), state)
    pos = model.encoder.pos_embedding
    assert pos.shape == (1, 1 + 6 * 6, 32)
    expected = interpolate_embeddings(96, 16, dict(state))["encoder.pos_embedding"]
    torch.testing.assert_close(pos.detach(), expected, rtol=0, atol=0)
    torch.testing.assert_close(pos[0, 0].detach(), state["encoder.pos_embedding"][0, 0])  # class token kept
    torch.testing.assert_close(model.conv_proj.weight.detach(), state["conv_proj.weight"])


def test_vit_b_32_erf_through_compute_panels():
    from vmamba_cli.erf import compute_panels

    specs = panel_specs([], compare=["vit_b_32"])[1:]
    (result,) = compute_panels(specs, InputSource("noise", 64, noise_count=1), num_images=1)
    assert result.spec.title == "vit_b_32 (random init)" and result.weights_file is None
    assert result.erf.raw.shape == (64, 64) and result.erf.raw.max() > 0
    with pytest.raises(ValueError, match="divisible by its patch size 32"):
        compute_panels(specs, InputSource("noise", 48, noise_count=1), num_images=1)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torchvision cache (TORCH_HOME), and a network that must not be touched."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    calls = []

    def no_download(url, *args, **kwargs):
        calls.append(url)
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    checkpoints = home / "hub" / "checkpoints"
    return checkpoints, calls


def test_released_peer_weights_come_from_torchvision_cache(torch_home, tmp_path):
    import torchvision
    from typer.testing import CliRunner

    from vmamba_cli.cli import app
    from vmamba_cli.peers import build_peer

    checkpoints, calls = torch_home
    checkpoints.mkdir(parents=True)
    name = "resnet18-f37072fd.pth"  # what torchvision's ResNet18_Weights.IMAGENET1K_V1 downloads to
    assert torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url.endswith("/" + name)
    torch.manual_seed(7)
    released = torchvision.models.resnet18()
    with torch.no_grad():
        released.conv1.weight.mul_(3.0)  # unlike any fresh init
    torch.save(released.state_dict(), checkpoints / name)

    model = build_peer("resnet18", "DEFAULT")
    torch.testing.assert_close(model.conv1.weight, released.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.fc.bias, released.fc.bias, rtol=0, atol=0)

    result = CliRunner().invoke(app, ["erf", "--noise", "-r", "64", "-n", "1", "--out", str(tmp_path / "e.png"),
                                      "--save-map", str(tmp_path / "m.npy"), "--json",
                                      "--compare", "resnet18:IMAGENET1K_V1", "resnet18"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    peers = doc["panels"][1:]
    assert [(p["title"], p["weights"]) for p in peers] == [
        ("resnet18 (IMAGENET1K_V1)", "IMAGENET1K_V1"), ("resnet18 (random init)", None)]
    assert peers[0]["weights_file"] == str(checkpoints / name) and peers[1]["weights_file"] is None
    raw = np.load(tmp_path / "m.npy")
    assert not np.allclose(raw[1], raw[2])  # the released weights changed the map
    assert calls == []


def test_missing_peer_checkpoint_is_one_line_and_no_download(torch_home, tmp_path):
    from typer.testing import CliRunner

    from vmamba_cli.cli import app

    checkpoints, calls = torch_home
    out = tmp_path / "e.png"
    result = CliRunner().invoke(app, ["erf", "--noise", "-r", "64", "-n", "1", "--out", str(out),
                                      "--compare", "swin_t", "convnext_tiny:DEFAULT"])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "convnext_tiny-983f1562.pth" in lines[0] and str(checkpoints) in lines[0] and "--download" in lines[0]
    assert "Traceback" not in result.output and not out.exists() and calls == []


def test_released_vit_weights_load_at_another_size(torch_home, monkeypatch):
    import torchvision
    from torchvision.models.vision_transformer import interpolate_embeddings

    from vmamba_cli.peers import build_peer

    checkpoints, calls = torch_home
    entry = torchvision.models.ViT_B_32_Weights.IMAGENET1K_V1
    checkpoints.mkdir(parents=True)
    (checkpoints / entry.url.rsplit("/", 1)[1]).touch()  # present in the cache; its content comes from below
    torch.manual_seed(5)
    state = torchvision.models.vit_b_32().state_dict()  # a 224 model: 7x7 grid
    monkeypatch.setattr(torchvision.models.ViT_B_32_Weights, "get_state_dict", lambda self, *a, **k: dict(state))
    model = build_peer("vit_b_32", "DEFAULT", image_size=64)
    assert model.image_size == 64 and model.encoder.pos_embedding.shape == (1, 1 + 2 * 2, 768)
    expected = interpolate_embeddings(64, 32, dict(state))["encoder.pos_embedding"]
    torch.testing.assert_close(model.encoder.pos_embedding.detach(), expected, rtol=0, atol=0)
    assert calls == []


def test_download_flag_fetches_into_the_cache_and_fails_in_one_line(torch_home, monkeypatch):
    import urllib.error

    import torchvision

    from vmamba_cli.peers import PeerWeightsMissing, build_peer

    checkpoints, _ = torch_home
    torch.manual_seed(11)
    released = torchvision.models.resnet18().state_dict()
    fetched = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        fetched.append((url, hash_prefix))
        torch.save(released, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    model = build_peer("resnet18", "IMAGENET1K_V1", download=True)
    assert fetched == [(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url, "f37072fd")]
    assert (checkpoints / "resnet18-f37072fd.pth").is_file()
    torch.testing.assert_close(model.conv1.weight, released["conv1.weight"], rtol=0, atol=0)

    def offline(url, dst, hash_prefix=None, progress=True):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(PeerWeightsMissing) as info:
        build_peer("resnet34", "DEFAULT", download=True)
    message = str(info.value)
    assert "\n" not in message and "resnet34-b627a593.pth" in message and "Name or service" in message
    assert not (checkpoints / "resnet34-b627a593.pth").exists()
