"""Loading weights: official .pth layout, legacy v0 names, restricted unpickling, clear errors."""

import os
import re
import sys
import textwrap

import pytest
import torch

from vmamba_cli.model import VMambaConfig, VSSM
from vmamba_cli.weights import (CheckpointError, checkpoint_filter_fn, load_model, load_weights_into,
                                read_state_dict, save_model)

V0_SMALL = VMambaConfig(dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), d_state=4, ssm_ratio=2.0, ssm_conv_bias=True,
                        gated=True, mlp_ratio=0.0, num_classes=5, channels_first=False, stem="v1", downsample="v1")
V2_SMALL = VMambaConfig(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_classes=5)


def _to_legacy(key: str) -> str:
    """Our (current official) key -> the January-2024 name found in the v0 release files."""
    for new, old in (("patch_embed.0.", "patch_embed.proj."), ("patch_embed.2.", "patch_embed.norm."),
                     ("classifier.norm.", "norm."), ("classifier.head.", "head.")):
        if key.startswith(new):
            return old + key[len(new):]
    key = re.sub(r"(layers\.\d+\.blocks\.\d+)\.norm\.", r"\1.ln_1.", key)
    return re.sub(r"(layers\.\d+\.blocks\.\d+)\.op\.", r"\1.self_attention.", key)


@pytest.fixture
def fake_yacs(tmp_path, monkeypatch):
    """A stand-in `yacs.config.CfgNode` so saved files carry the same pickled class as the official ones."""
    pkg = tmp_path / "fakeyacs" / "yacs"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text(textwrap.dedent("""
        class CfgNode(dict):
            def __init__(self, init=None):
                super().__init__(init or {})
                self.__dict__["__immutable__"] = False
        RAN = []
        class Evil:
            def __reduce__(self):
                return (RAN.append, ("executed",))
    """))
    monkeypatch.syspath_prepend(str(tmp_path / "fakeyacs"))
    import yacs.config

    yield yacs.config
    for name in ("yacs", "yacs.config"):
        sys.modules.pop(name, None)


def _official_file(path, state_dict, cfg_class, **extra):
    config = cfg_class({"MODEL": cfg_class({"NAME": "vssm_tiny", "DEPTHS": [2, 2, 9, 2]}), "TRAIN": cfg_class({"LR": 1e-3})})
    torch.save({"model": state_dict, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]},
                "lr_scheduler": {"last": 1}, "max_accuracy": 82.2, "epoch": 292, "config": config, **extra}, path)


def test_legacy_v0_checkpoint_loads_with_identical_logits(tmp_path, fake_yacs):
    torch.manual_seed(0)
    model = VSSM(V0_SMALL).eval()
    legacy = {_to_legacy(k): v for k, v in model.state_dict().items()}
    assert "layers.0.blocks.0.ln_1.weight" in legacy and "patch_embed.proj.weight" in legacy
    assert "layers.2.blocks.1.self_attention.x_proj_weight" in legacy and "head.weight" in legacy
    path = tmp_path / "vssmtiny_legacy.pth"
    _official_file(path, legacy, fake_yacs.CfgNode)

    loaded = VSSM(V0_SMALL).eval()
    load_weights_into(loaded, path)
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_entry_selection_model_then_ema(tmp_path, fake_yacs):
    torch.manual_seed(0)
    a, b = VSSM(V2_SMALL), VSSM(V2_SMALL)
    path = tmp_path / "ckpt.pth"
    _official_file(path, a.state_dict(), fake_yacs.CfgNode, model_ema=b.state_dict())
    tensors, _ = read_state_dict(path)
    assert torch.equal(tensors["classifier.head.weight"], a.state_dict()["classifier.head.weight"])
    tensors, _ = read_state_dict(path, ema=True)
    assert torch.equal(tensors["classifier.head.weight"], b.state_dict()["classifier.head.weight"])
    # DDP prefixes are stripped, a raw state dict works too
    torch.save({"module." + k: v for k, v in a.state_dict().items()}, tmp_path / "raw.pth")
    c = VSSM(V2_SMALL)
    load_weights_into(c, tmp_path / "raw.pth")
    assert torch.equal(c.classifier.head.weight, a.classifier.head.weight)


def test_pickled_code_is_refused(tmp_path, fake_yacs):
    path = tmp_path / "evil.pth"
    torch.save({"model": VSSM(V2_SMALL).state_dict(), "payload": fake_yacs.Evil()}, path)
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    assert fake_yacs.RAN == []
    assert str(err.value).startswith(str(path)) and "refusing to unpickle" in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_files_raise_one_clear_error(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": VSSM(V2_SMALL).state_dict()}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    ours = save_model(tmp_path / "ours.safetensors", VSSM(V2_SMALL))
    cut_st = tmp_path / "cut.safetensors"
    cut_st.write_bytes(ours.read_bytes()[:1000])
    other = tmp_path / "other.pth"
    torch.save({"model": VSSM(V2_SMALL.replace(dims=(8, 16, 32, 64))).state_dict()}, other)

    cases = {truncated: "truncated or corrupt", text: "not a checkpoint", cut_st: "safetensors",
             other: "shape conflicts", tmp_path / "missing.pth": "no such file", tmp_path: "directory"}
    for path, problem in cases.items():
        with pytest.raises(CheckpointError) as err:
            load_weights_into(VSSM(V2_SMALL), path)
        message = str(err.value)
        assert message.startswith(f"{path}: "), message
        assert problem in message, message
        assert "\n" not in message and len(message) < 400


def test_mismatch_message_names_keys(tmp_path):
    v0_state = VSSM(V0_SMALL).state_dict()
    path = tmp_path / "v0.pth"
    torch.save({"model": v0_state}, path)
    with pytest.raises(CheckpointError) as err:
        load_weights_into(VSSM(V2_SMALL), path)
    message = str(err.value)
    assert "missing keys" in message and "unexpected keys" in message
    assert "40 missing keys (patch_embed.5.weight" in message          # v2 stem's second conv
    assert "layers.0.downsample.reduction.weight" in message           # v0 PatchMerging
    assert "patch_embed.0.weight [16, 3, 4, 4] vs [8, 3, 3, 3]" in message


def test_filter_fn_maps_fixture_prefix_and_module():
    t = torch.zeros(1)
    mapped = checkpoint_filter_fn({"state_dict.head.weight": t, "input": t})
    assert mapped == {"classifier.head.weight": t}
    assert checkpoint_filter_fn({"module.layers.0.blocks.0.ln_1.bias": t}) == {"layers.0.blocks.0.norm.bias": t}


def test_safetensors_round_trip_with_metadata(tmp_path):
    torch.manual_seed(3)
    model = VSSM(V2_SMALL).eval()
    path = save_model(tmp_path / "m.safetensors", model, name="custom", class_names=list("abcde"),
                      extra={"source": "unit test"})
    loaded = load_model(weights=path)
    assert loaded.class_names == list("abcde") and loaded.metadata["source"] == "unit test"
    assert loaded.model.config == model.config
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(x), model(x))
    assert not list(tmp_path.glob("*.tmp"))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    from vmamba_cli.weights import atomic_write

    target = tmp_path / "w.safetensors"

    def explode(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, explode)
    assert list(tmp_path.iterdir()) == []


def test_preset_round_trip_and_bad_preset_metadata(tmp_path):
    from vmamba_cli.model import Preprocess
    from vmamba_cli.weights import save_weights

    model = VSSM(V2_SMALL).eval()
    preset = Preprocess(input_size=48, crop_pct=0.9, interpolation="bilinear", mean=(0.5, 0.5, 0.5),
                        std=(0.25, 0.25, 0.25))
    path = save_model(tmp_path / "p.safetensors", model, preprocess=preset)
    assert load_model(weights=path).preprocess == preset
    assert load_model(weights=path).metadata["preprocess"]["input_size"] == 48

    bad = tmp_path / "bad.safetensors"
    save_weights(bad, model.state_dict(), {"model": "custom", "config": model.config.to_dict(),
                                           "preprocess": {"input_size": 48, "crop_pct": 3.0}})
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: bad preprocess metadata .*crop_pct"):
        load_model(weights=bad)


def test_create_model_with_weights_loads_strictly(tmp_path):
    """README API: vmamba_cli.create_model(name, weights=...) builds and loads in one call."""
    import vmamba_cli
    import vmamba_cli.model as model_module

    spec = model_module.ModelSpec("vmamba-ckpt-test", V2_SMALL, "-", "-", "ckpt_test.pth", "#v2cls", 0.0, None, 0, 0)
    torch.manual_seed(5)
    source = VSSM(V2_SMALL).eval()
    path = tmp_path / "weights.pth"
    torch.save({"model": source.state_dict()}, path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(model_module.MODELS, spec.name, spec)
        mp.setitem(model_module._ALIASES, spec.name, spec.name)
        built = vmamba_cli.create_model(spec.name, weights=path).eval()
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(built(x), source(x))
        other = tmp_path / "other.pth"
        torch.save({"model": VSSM(V2_SMALL.replace(num_classes=7)).state_dict()}, other)
        with pytest.raises(CheckpointError):
            vmamba_cli.create_model(spec.name, weights=other)
    assert not hasattr(VSSM, "load_checkpoint")


def test_training_metadata_without_a_preset_still_sets_it(tmp_path):
    """`vmamba train` records image_size / eval_crop_pct: save_model and load_model read them as the preset."""
    from vmamba_cli.model import Preprocess
    from vmamba_cli.weights import save_weights

    model = VSSM(V2_SMALL).eval()
    path = save_model(tmp_path / "t.safetensors", model, extra={"image_size": 32, "eval_crop_pct": 1.0})
    assert load_model(weights=path).preprocess == Preprocess(input_size=32, crop_pct=1.0)
    older = tmp_path / "older.safetensors"  # written before checkpoints carried "preprocess"
    save_weights(older, model.state_dict(), {"model": "custom", "config": model.config.to_dict(), "image_size": 40})
    assert load_model(weights=older).preprocess == Preprocess(input_size=40)
