"""`vmamba predict` and ``vmamba_cli.predict.predict`` on real photos (skimage.data) and broken inputs.

A small VMamba with random weights (head scaled so the probabilities are far from uniform) stands in
for the released checkpoints, which cannot be downloaded here; the registry path is covered in
test_weights_registry.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vmamba_cli.cli import app
from vmamba_cli.data import eval_transform, imagenet_class_names, load_image
from vmamba_cli.model import Preprocess, VMambaConfig, VSSM
from vmamba_cli.predict import predict
from vmamba_cli.weights import load_model, save_model

SMALL = VMambaConfig(dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_classes=1000)
runner = CliRunner()


def _small_model(num_classes: int, seed: int) -> VSSM:
    torch.manual_seed(seed)
    model = VSSM(SMALL.replace(num_classes=num_classes))
    with torch.no_grad():
        model.classifier.head.weight.mul_(40.0)  # spread the logits: distinct, non-uniform probabilities
        model.classifier.head.bias.normal_(0.0, 1.0)
    return model.eval()


@pytest.fixture
def small_spec(monkeypatch):
    """A registered small model, so that --model paths build in milliseconds instead of vmamba-tiny."""
    import vmamba_cli.model as model_module

    spec = model_module.ModelSpec("vmamba-small-test", SMALL, "-", "-", "small_test.pth", "#v2cls", 0.0, None, 0, 0)
    monkeypatch.setitem(model_module.MODELS, spec.name, spec)
    monkeypatch.setitem(model_module._ALIASES, spec.name, spec.name)
    return spec


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "small.safetensors"
    save_model(path, _small_model(1000, seed=0))
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Real photos in several formats, one in a subfolder, one grayscale, one 16-bit, one RGBA."""
    import skimage.data

    root = tmp_path_factory.mktemp("photos")
    (root / "more").mkdir()
    Image.fromarray(skimage.data.chelsea()).save(root / "chelsea.jpg", quality=92)
    Image.fromarray(skimage.data.coffee()).save(root / "coffee.png")
    Image.fromarray(skimage.data.astronaut()).save(root / "astronaut.jpg", quality=92)
    Image.fromarray(skimage.data.rocket()).save(root / "more" / "rocket.jpg", quality=92)
    Image.fromarray(skimage.data.camera()).save(root / "more" / "camera.png")
    Image.fromarray(skimage.data.camera().astype(np.uint16) * 257).save(root / "more" / "camera16.png")
    Image.fromarray(skimage.data.logo()).save(root / "more" / "logo.png")
    return root


def _direct_top(model, paths: list[Path], resolution: int, k: int, crop_pct: float | None = None):
    """Top-k of the same photos, preprocessed here and run as one batch of a separately loaded model."""
    x = torch.stack([eval_transform(resolution, crop_pct)(load_image(p)) for p in paths])
    with torch.no_grad():
        values, indices = model(x).softmax(-1).topk(k, dim=-1)
    return indices.tolist(), values.tolist()


@pytest.mark.parametrize("resolution, batch_size, pattern", [(224, 3, "**/*"), (160, 16, "*.jpg")])
def test_topk_matches_a_direct_forward(photos, weights_file, resolution, batch_size, pattern):
    inputs = [photos] if pattern == "**/*" else [str(photos / pattern)]
    report = predict(inputs, weights=weights_file, topk=5, device="cpu", batch_size=batch_size,
                     resolution=resolution)
    names = imagenet_class_names()
    expected_files = sorted(p for p in photos.glob(pattern) if p.is_file())
    assert len(expected_files) == (7 if pattern == "**/*" else 2)
    assert [Path(p.path) for p in report.predictions] == expected_files
    assert report.failures == [] and report.ok
    assert report.resolution == resolution and report.topk == 5 and report.device == "cpu"

    reference = load_model(weights=weights_file).model.eval()
    indices, values = _direct_top(reference, expected_files, resolution, 5)
    for prediction, want_indices, want_values in zip(report.predictions, indices, values):
        assert [s.index for s in prediction.top] == want_indices
        np.testing.assert_allclose([s.probability for s in prediction.top], want_values, atol=1e-5, rtol=1e-4)
        assert [s.label for s in prediction.top] == [names[i] for i in want_indices]
        assert prediction.top[0].probability > 0.02  # far from uniform (1/1000): the check has teeth
    assert len({p.top[0].index for p in report.predictions}) > 1  # different photos, different answers


def _bad_inputs(root: Path) -> dict[str, Path]:
    root.mkdir(exist_ok=True)
    good = (root / "cat.jpg")
    import skimage.data

    Image.fromarray(skimage.data.chelsea()).save(good, quality=92)
    truncated = root / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = root / "notes.jpg"
    text.write_text("this is not a picture\n")
    empty = root / "empty"
    empty.mkdir(exist_ok=True)
    return {"good": good, "truncated": truncated, "text": text, "missing": root / "missing.jpg", "empty": empty}


def test_bad_inputs_are_reported_and_the_rest_predicted(tmp_path, photos, weights_file):
    bad = _bad_inputs(tmp_path / "in")
    inputs = [bad["good"], bad["truncated"], bad["text"], bad["missing"], bad["empty"],
              str(tmp_path / "in" / "*.gif"), str(photos / "*.png")]
    report = predict(inputs, weights=weights_file, topk=3, device="cpu")
    assert [Path(p.path) for p in report.predictions] == [bad["good"], photos / "coffee.png"]
    reasons = {Path(f.path).name: f.error for f in report.failures}
    assert reasons == {
        "truncated.jpg": reasons["truncated.jpg"], "notes.jpg": "not an image (unrecognised format)",
        "missing.jpg": "no such file", "empty": "folder contains no images", "*.gif": "pattern matched no files",
    }
    assert reasons["truncated.jpg"].startswith("unreadable image") and "truncated" in reasons["truncated.jpg"]
    assert not report.ok


def test_cli_json_document_and_exit_status(tmp_path, photos, weights_file):
    bad = _bad_inputs(tmp_path / "in")
    result = runner.invoke(app, ["predict", "--weights", str(weights_file), "--json", "--topk", "3",
                                 "--batch-size", "2", str(photos / "*.jpg"), str(bad["text"]), str(bad["missing"])])
    assert result.exit_code == 1
    document = json.loads(result.stdout)  # stdout holds the JSON document and nothing else
    assert set(document) == {"model", "weights", "device", "resolution", "crop_pct", "topk", "amp", "predictions",
                             "failures", "seconds"}
    assert document["model"] == "custom" and document["weights"] == str(weights_file)
    assert document["topk"] == 3 and document["resolution"] == 224 and document["amp"] == "none"
    assert document["crop_pct"] == pytest.approx(224 / 256)
    assert [Path(p["path"]).name for p in document["predictions"]] == ["astronaut.jpg", "chelsea.jpg"]
    for prediction in document["predictions"]:
        assert [set(s) for s in prediction["top"]] == [{"index", "label", "probability"}] * 3
        probabilities = [s["probability"] for s in prediction["top"]]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6
    assert [(Path(f["path"]).name, f["error"]) for f in document["failures"]] == [
        ("missing.jpg", "no such file"), ("notes.jpg", "not an image (unrecognised format)")]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error_lines == [f"error: {bad['missing']}: no such file",
                           f"error: {bad['text']}: not an image (unrecognised format)"]


def test_cli_table_on_stderr(photos, weights_file, monkeypatch):
    monkeypatch.chdir(photos)
    expected = predict(["chelsea.jpg", "coffee.png"], weights=weights_file, topk=2, device="cpu")
    result = runner.invoke(app, ["predict", "chelsea.jpg", "coffee.png", "-w", str(weights_file), "-k", "2",
                                 "--amp", "none"])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    for prediction in expected.predictions:
        assert prediction.path in result.stderr
        for score in prediction.top:
            assert score.label in result.stderr and f"{score.probability:.4f}" in result.stderr
    assert "2 image(s) predicted" in result.stderr


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_is_spelled_like_every_command(photos, weights_file, amp):
    """--amp auto|none|bf16|fp16 (vmamba_cli.runtime): autocast on CPU too, close to float32."""
    files = [str(photos / "chelsea.jpg"), str(photos / "coffee.png")]
    full = predict(files, weights=weights_file, topk=1, device="cpu", amp="none")
    assert predict(files, weights=weights_file, topk=1, device="cpu").amp == "none"  # auto: float32 on CPU
    result = runner.invoke(app, ["predict", *files, "-w", str(weights_file), "-k", "1", "--device", "cpu",
                                 "--amp", amp, "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["amp"] == amp
    for low, high in zip(document["predictions"], full.predictions):
        assert low["top"][0]["probability"] == pytest.approx(high.top[0].probability, abs=0.05)
    result = runner.invoke(app, ["predict", *files, "-w", str(weights_file), "--amp", "fp32"])
    assert result.exit_code == 2 and "must be one of auto, none, bf16, fp16" in result.stderr


def test_labels_from_file_and_from_checkpoint_metadata(tmp_path, photos, weights_file):
    names = [f"thing-{i}" for i in range(1000)]
    (tmp_path / "labels.txt").write_text("\n".join(names) + "\n")
    (tmp_path / "labels.json").write_text(json.dumps(names))
    for labels in ("labels.txt", "labels.json"):
        report = predict([photos / "chelsea.jpg"], weights=weights_file, labels=tmp_path / labels, device="cpu")
        assert [s.label for s in report.predictions[0].top] == [f"thing-{s.index}" for s in report.predictions[0].top]

    (tmp_path / "short.txt").write_text("a\nb\n")
    result = runner.invoke(app, ["predict", str(photos / "chelsea.jpg"), "-w", str(weights_file),
                                 "--labels", str(tmp_path / "short.txt")])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.strip() == f"error: {tmp_path / 'short.txt'}: has 2 class names but the model has 1000 classes"

    three = tmp_path / "three.safetensors"
    save_model(three, _small_model(3, seed=1), class_names=["tabby", "espresso", "astronaut"])
    report = predict([photos / "chelsea.jpg"], weights=three, topk=5, device="cpu")
    assert report.topk == 3 and sorted(s.label for s in report.predictions[0].top) == ["astronaut", "espresso", "tabby"]
    assert sum(s.probability for s in report.predictions[0].top) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("file_name, make, message", [
    ("model.pth", lambda p: p.write_text("not weights"), "not a checkpoint"),
    ("model.safetensors", lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken"),
     "not a readable safetensors file"),
    ("model.pth", lambda p: None, "no such file"),
], ids=["text", "broken-safetensors", "missing"])
def test_bad_weights_file_is_one_line(tmp_path, photos, small_spec, file_name, make, message):
    weights = tmp_path / file_name
    make(weights)
    result = runner.invoke(app, ["predict", str(photos / "chelsea.jpg"), "--weights", str(weights),
                                 "--model", small_spec.name])
    assert result.exit_code == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {weights}") and message in lines[0]


def test_options_are_checked(photos, weights_file):
    if not torch.cuda.is_available():
        result = runner.invoke(app, ["predict", str(photos / "chelsea.jpg"), "-w", str(weights_file),
                                     "--device", "cuda"])
        assert result.exit_code == 1 and "no CUDA device" in result.stderr
    result = runner.invoke(app, ["predict", str(photos / "chelsea.jpg"), "-w", str(weights_file), "--topk", "0"])
    assert result.exit_code == 2  # usage error from the option's range
    with pytest.raises(ValueError, match="topk"):
        predict([photos], weights=weights_file, topk=0)


def test_checkpoint_preset_sets_the_input_size(tmp_path, photos):
    """A model saved with a 32x32 preset (what `vmamba train` records) predicts at 32 without flags."""
    model = _small_model(1000, seed=2)
    preset = Preprocess(input_size=32, crop_pct=1.0)
    path = tmp_path / "trained32.safetensors"
    save_model(path, model, preprocess=preset)
    loaded = load_model(weights=path)
    assert loaded.preprocess == preset

    files = [photos / "chelsea.jpg", photos / "coffee.png"]
    report = predict(files, weights=path, topk=5, device="cpu")
    assert report.resolution == 32 and report.crop_pct == 1.0
    indices, values = _direct_top(model, files, 32, 5, crop_pct=1.0)
    for prediction, want_indices, want_values in zip(report.predictions, indices, values):
        assert [s.index for s in prediction.top] == want_indices
        np.testing.assert_allclose([s.probability for s in prediction.top], want_values, atol=1e-5, rtol=1e-4)
    # The default 224 pipeline gives other inputs, so the check above depends on the preset.
    other = predict(files, weights=path, topk=5, device="cpu", resolution=224, crop_pct=224 / 256)
    assert other.resolution == 224
    assert [[s.index for s in p.top] for p in other.predictions] != indices

    result = runner.invoke(app, ["predict", str(files[0]), "-w", str(path), "--json", "--crop-pct", "0.5"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["resolution"] == 32 and document["crop_pct"] == 0.5


def test_preset_of_registered_models_and_plain_files(tmp_path):
    from vmamba_cli.model import MODELS

    assert all(spec.preprocess == Preprocess() for spec in MODELS.values())
    assert Preprocess().resize_size == 256 and Preprocess().interpolation == "bicubic"
    # A file saved without a preset records the standard one.
    path2 = tmp_path / "default.safetensors"
    save_model(path2, _small_model(1000, seed=3))
    assert load_model(weights=path2).preprocess == Preprocess()
    with pytest.raises(ValueError, match="crop_pct"):
        Preprocess(crop_pct=1.5)
    with pytest.raises(ValueError, match="unknown preprocessing keys"):
        Preprocess.from_dict({"input_size": 32, "size": 3})
