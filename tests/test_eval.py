"""`vmamba eval` / vmamba_cli.evaluate: numbers against the model run directly, failures, torchrun sharding,
class mapping (ImageNet WordNet ids, checkpoint class names, sorted folders)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from vmamba_cli.cli import app
from vmamba_cli.data import Preprocess, eval_transform, load_image
from vmamba_cli.evaluate import (EXIT_ERROR, EXIT_IMAGE_FAILURES, EXIT_OK, EvalImageDataset, collate_eval,
                                 evaluate, imagenet_wnids, map_classes)
from vmamba_cli.model import VMambaConfig, VSSM
from vmamba_cli.weights import save_model

RESOLUTION = 32
CROP_PCT = 0.875
IMAGES_PER_CLASS = 3
EXTRA_IMAGES = 1                       # one more digit so that the readable images are odd in number
BROKEN = ("9/zz_not_an_image.png", "9/zz_truncated.png")
TINY = dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), d_state=1, drop_path_rate=0.0)


def _render_digit(pixels: np.ndarray, size: int = 40) -> Image.Image:
    """A sklearn digit (8x8, 0..16) as an upsampled grayscale image."""
    im = Image.fromarray((pixels * (255.0 / 16.0)).astype(np.uint8), mode="L")
    return im.resize((size, size + 4), Image.BILINEAR)  # not square: the short-side resize matters


def build_digits_folder(root: Path, per_class: int = IMAGES_PER_CLASS, extra: int = EXTRA_IMAGES,
                        broken: bool = True) -> list[tuple[Path, int]]:
    """Class folders 0..9 of real handwritten digits (scikit-learn) as PNGs; returns (path, label)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    wanted = {c: per_class + (1 if c < extra else 0) for c in range(10)}
    taken = {c: 0 for c in range(10)}
    samples = []
    for pixels, label in zip(digits.images, digits.target):
        label = int(label)
        if taken[label] >= wanted[label]:
            continue
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"digit_{taken[label]:02d}.png"
        _render_digit(pixels).save(path)
        samples.append((path, label))
        taken[label] += 1
        if taken == wanted:
            break
    if broken:
        (root / BROKEN[0]).write_bytes(b"this is not a PNG file\n")
        good = (root / "9" / "digit_00.png").read_bytes()
        (root / BROKEN[1]).write_bytes(good[: len(good) // 2])
        (root / "9" / "notes.txt").write_text("not an image: ignored, not a failure\n")
    return sorted(samples)


def tiny_model(num_classes: int = 10, seed: int = 0) -> VSSM:
    torch.manual_seed(seed)
    model = VSSM(VMambaConfig(num_classes=num_classes, **TINY)).eval()
    with torch.no_grad():  # a wider head spreads the logits so that predictions differ between images
        model.classifier.head.weight.normal_(0.0, 1.0)
    return model


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    data = root / "val"
    samples = build_digits_folder(data)
    model = tiny_model()
    weights = save_model(root / "tiny.safetensors", model)
    return data, samples, model, weights


@pytest.fixture(scope="module")
def single_run(digits):
    data, _, _, weights = digits
    return evaluate(data, weights=weights, resolution=RESOLUTION, crop_pct=CROP_PCT, device="cpu",
                    batch_size=8, workers=0, predictions=True)


def direct_predictions(model, samples):
    """Logits of the model run by hand on the same preprocessing."""
    transform = eval_transform(RESOLUTION, CROP_PCT)
    x = torch.stack([transform(load_image(p)) for p, _ in samples])
    targets = torch.tensor([t for _, t in samples])
    with torch.inference_mode():
        logits = model(x).double()
    return logits, targets


def test_numbers_match_the_model_run_directly(digits, single_run):
    data, samples, model, weights = digits
    result = single_run
    logits, targets = direct_predictions(model, samples)
    top5 = logits.topk(5, dim=1).indices
    assert result.num_images == len(samples) == 10 * IMAGES_PER_CLASS + EXTRA_IMAGES
    assert result.correct_top1 == int((logits.argmax(1) == targets).sum())
    assert result.correct_top5 == int((top5 == targets[:, None]).any(1).sum())
    assert result.top1 == pytest.approx(100.0 * result.correct_top1 / len(samples))
    assert result.loss == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-5)
    assert result.class_mapping == "sorted-folders" and result.num_classes == 10
    assert 0 < result.correct_top1 < len(samples)  # the comparison above is not trivially all-or-nothing
    # Per image: the right target and the model's own top-5, in folder order.
    readable = [p for p in result.predictions if p.error is None]
    assert [(Path(p.path), p.target) for p in readable] == samples
    assert [p.topk for p in readable] == top5.tolist()
    probs = logits.softmax(1).gather(1, top5)
    assert np.allclose([p.probs for p in readable], probs.numpy(), atol=1e-6)


def test_unreadable_images_are_counted_listed_and_set_the_exit_status(digits, tmp_path):
    data, samples, _, weights = digits
    out, preds = tmp_path / "res" / "eval.json", tmp_path / "pred.csv"
    r = CliRunner().invoke(app, ["eval", str(data), "--weights", str(weights), "--resolution", str(RESOLUTION),
                                 "--crop-pct", str(CROP_PCT), "--device", "cpu", "--batch-size", "16",
                                 "--workers", "2", "--json", "--output", str(out), "--predictions", str(preds)])
    assert r.exit_code == EXIT_IMAGE_FAILURES, r.output
    doc = json.loads(r.stdout)
    assert doc == json.loads(out.read_text())
    assert doc["num_failed"] == len(BROKEN) and doc["num_images"] == len(samples)
    assert doc["ignored_files"] == 1
    failed = {Path(f["path"]).relative_to(data).as_posix(): f["reason"] for f in doc["failures"]}
    assert set(failed) == set(BROKEN)
    assert "not an image" in failed[BROKEN[0]]
    assert "unreadable" in failed[BROKEN[1]] or "truncated" in failed[BROKEN[1]]
    for broken in BROKEN:
        assert broken in r.stderr  # listed in the human summary too
    assert "top-1" in r.stderr and not r.stderr.lstrip().startswith("{")

    # JSON schema: the documented keys with their types.
    schema = {"model": str, "weights": str, "data_dir": str, "top1": float, "top5": float, "top5_k": int,
              "loss": float, "num_images": int, "num_failed": int, "correct_top1": int, "correct_top5": int,
              "images_per_sec": float, "wall_time_s": float, "num_classes": int, "num_class_folders": int,
              "class_mapping": str, "ignored_files": int, "resolution": int, "crop_pct": float, "device": str,
              "batch_size": int, "world_size": int, "ema": bool, "failures": list}
    for key, kind in schema.items():
        assert isinstance(doc[key], kind), (key, doc[key])
    assert doc["amp"] is None and doc["world_size"] == 1 and doc["top5_k"] == 5
    assert doc["top1"] == pytest.approx(100.0 * doc["correct_top1"] / doc["num_images"])

    rows = list(csv.DictReader(preds.open()))
    assert len(rows) == len(samples) + len(BROKEN)
    errors = {Path(row["path"]).relative_to(data).as_posix() for row in rows if row["error"]}
    assert errors == set(BROKEN)
    good = [row for row in rows if not row["error"]]
    assert sum(int(row["correct"]) for row in good) == doc["correct_top1"]
    assert sum(row["target"] in {row[f"pred_{j}"] for j in range(1, 6)} for row in good) == doc["correct_top5"]
    assert all(row["name_1"] == row["pred_1"] for row in good)  # folder names are the labels here


def test_clean_subset_exits_zero(digits):
    data, samples, _, weights = digits
    r = CliRunner().invoke(app, ["eval", str(data), "-w", str(weights), "-r", str(RESOLUTION), "--device", "cpu",
                                 "--limit", "7", "--workers", "0", "--json"])
    assert r.exit_code == EXIT_OK, r.output
    doc = json.loads(r.stdout)
    assert doc["num_images"] == 7 and doc["num_failed"] == 0 and doc["failures"] == []


def test_two_processes_give_exactly_the_one_process_numbers(digits, single_run, tmp_path):
    data, samples, _, weights = digits
    single = single_run
    files = len(samples) + len(BROKEN)
    assert files % 2 == 1 and len(samples) % 2 == 1  # shards of unequal size
    out, preds = tmp_path / "dist.json", tmp_path / "dist.csv"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "vmamba_cli", "eval", str(data), "--weights", str(weights), "--resolution", str(RESOLUTION),
           "--crop-pct", str(CROP_PCT), "--device", "cpu", "--batch-size", "4", "--workers", "0",
           "--output", str(out), "--predictions", str(preds)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0, "image failures must give a non-zero status under torchrun too"
    assert out.exists(), proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["world_size"] == 2
    assert doc["num_images"] == single.num_images
    assert doc["num_failed"] == single.num_failed == len(BROKEN)
    assert doc["correct_top1"] == single.correct_top1 and doc["correct_top5"] == single.correct_top5
    assert doc["top1"] == single.top1 and doc["top5"] == single.top5
    assert doc["loss"] == pytest.approx(single.loss, rel=1e-6)
    assert [f["path"] for f in doc["failures"]] == [f.path for f in single.failures]
    rows = list(csv.DictReader(preds.open()))
    assert [row["path"] for row in rows] == [p.path for p in single.predictions]  # each image once
    assert [row["pred_1"] for row in rows] == [str(p.topk[0]) if p.topk else "" for p in single.predictions]
    assert proc.stdout.strip() == ""  # no --json: nothing on stdout, and rank 1 printed nothing either
    assert proc.stderr.count("top-1") == 1  # one summary (rank 0)


def test_imagenet_wordnet_folders_map_to_the_standard_indices(tmp_path):
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and list(wnids) == sorted(set(wnids))
    assert wnids[0] == "n01440764" and wnids[-1] == "n15075141"  # tench ... toilet tissue
    picked = [0, 1, 417, 999]
    data = tmp_path / "imagenet_val"
    from sklearn.datasets import load_digits

    images = load_digits().images
    expected = []
    for j, index in enumerate(picked):
        (data / wnids[index]).mkdir(parents=True)
        path = data / wnids[index] / f"ILSVRC2012_val_{j:08d}.JPEG"
        _render_digit(images[j]).convert("RGB").save(path, format="JPEG")
        expected.append((path, index))
    mapping = map_classes(data, 1000)
    assert mapping.kind == "imagenet-wnid" and mapping.indices == picked

    model = tiny_model(num_classes=1000)
    result = evaluate(data, model, class_names=[f"class {i}" for i in range(1000)], resolution=RESOLUTION,
                      device="cpu", workers=0, predictions=True)
    assert [(Path(p.path), p.target) for p in result.predictions] == expected
    logits, targets = direct_predictions(model, expected)
    assert result.correct_top5 == int((logits.topk(5, 1).indices == targets[:, None]).any(1).sum())
    assert result.loss == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-5)

    # The same WordNet folders with a 10-class head: sorted order, since the head cannot be ImageNet's.
    assert map_classes(data, 4).kind == "sorted-folders"
    with pytest.raises(ValueError, match="WordNet ids, which need a 1000-class head"):
        map_classes(data, 10)


def test_checkpoint_class_names_decide_the_mapping(tmp_path):
    names = ["zero", "one", "two", "three"]
    for folder in ("three", "one"):
        (tmp_path / folder).mkdir()
    mapping = map_classes(tmp_path, 4, names)
    assert mapping.kind == "class-names"
    assert dict(zip(mapping.folders, mapping.indices)) == {"one": 1, "three": 3}
    # Names that do not cover the folders: back to sorted folders, which need as many folders as classes.
    with pytest.raises(ValueError, match="2 class folders but the model head has 4 classes"):
        map_classes(tmp_path, 4, ["a", "b", "c", "d"])
    assert map_classes(tmp_path, 2, ["a", "b"]).indices == [0, 1]


def test_class_count_mismatch_and_bad_folder_are_one_line_errors(digits, tmp_path):
    _, _, _, weights = digits
    for folder in ("cat", "dog", "fox"):
        (tmp_path / "three" / folder).mkdir(parents=True)
    runner = CliRunner()
    r = runner.invoke(app, ["eval", str(tmp_path / "three"), "--weights", str(weights), "--device", "cpu"])
    assert r.exit_code == EXIT_ERROR
    assert "3 class folders but the model head has 10 classes" in r.stderr
    assert "Traceback" not in r.output and len(r.stderr.strip().splitlines()) == 1
    r = runner.invoke(app, ["eval", str(tmp_path / "missing"), "--weights", str(weights), "--device", "cpu"])
    assert r.exit_code == EXIT_ERROR and "no such folder" in r.stderr and "missing" in r.stderr
    r = runner.invoke(app, ["eval", str(tmp_path / "three"), "--weights", str(tmp_path / "nope.pth")])
    assert r.exit_code == EXIT_ERROR and "nope.pth" in r.stderr


def test_dataset_returns_failure_markers_and_collate_keeps_them(digits):
    data, samples, _, _ = digits
    items = [(str(samples[0][0]), samples[0][1]), (str(data / BROKEN[0]), 9), (str(samples[1][0]), samples[1][1])]
    dataset = EvalImageDataset(items, eval_transform(RESOLUTION, CROP_PCT))
    batch = collate_eval([dataset[i] for i in range(len(dataset))])
    assert batch.images.shape == (2, 3, RESOLUTION, RESOLUTION)
    assert batch.indices.tolist() == [0, 2] and batch.targets.tolist() == [samples[0][1], samples[1][1]]
    assert len(batch.failures) == 1 and batch.failures[0][0] == 1 and "not an image" in batch.failures[0][1]
    only_bad = collate_eval([dataset[1]])
    assert only_bad.images is None and only_bad.indices.numel() == 0 and len(only_bad.failures) == 1


def test_nan_logits_are_counted_and_never_correct(digits):
    data, samples, model, _ = digits
    broken = tiny_model()
    with torch.no_grad():
        broken.classifier.head.bias[3] = float("nan")
    result = evaluate(data, broken, resolution=RESOLUTION, device="cpu", workers=0, limit=6)
    assert result.num_images == 6 and result.num_nonfinite == 6
    assert result.correct_top1 == result.correct_top5 == 0
    doc = result.to_dict()
    assert doc["loss"] is None and doc["num_nonfinite"] == 6
    json.dumps(doc, allow_nan=False)  # a valid JSON document, no NaN literal


def test_preprocessing_recorded_by_training_is_used_unless_given(digits, tmp_path):
    data, samples, model, _ = digits
    # What `vmamba train` records: the training size and the crop of its held-out evaluation.
    weights = save_model(tmp_path / "trained.safetensors", model, preprocess=Preprocess(input_size=40, crop_pct=1.0))
    recorded = evaluate(data, weights=weights, device="cpu", workers=0, limit=4)
    assert (recorded.resolution, recorded.crop_pct) == (40, 1.0)
    given = evaluate(data, weights=weights, resolution=RESOLUTION, crop_pct=CROP_PCT, device="cpu", workers=0, limit=4)
    assert (given.resolution, given.crop_pct) == (RESOLUTION, CROP_PCT)
    plain = evaluate(data, model, device="cpu", workers=0, limit=4)  # a module without a checkpoint: defaults
    assert (plain.resolution, plain.crop_pct) == (224, 0.875)
