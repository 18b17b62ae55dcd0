"""Accuracy against resolution: `vmamba eval DIR -r 24 32 48` / ``evaluate_resolutions``: one row per
size with the model loaded once, the JSON shape, the plot, several weights on one plot, torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image
from typer.testing import CliRunner

from test_eval import build_digits_folder, tiny_model  # noqa: E402  (tests/ is on sys.path under pytest)
from vmamba_cli.cli import app
from vmamba_cli.errors import EXIT_OK, EXIT_USAGE
from vmamba_cli.evaluate import evaluate, evaluate_resolutions, plot_accuracy_vs_resolution, sweep_document
from vmamba_cli.weights import save_model

SIZES = [24, 32, 48]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits_res")
    data = root / "val"
    build_digits_folder(data, broken=False)
    first = save_model(root / "first.safetensors", tiny_model(seed=0))
    second = save_model(root / "second.safetensors", tiny_model(seed=1))
    return data, first, second


def _cli(*args: str):
    return CliRunner().invoke(app, ["eval", *args, "--device", "cpu", "--workers", "0"])


def test_each_size_equals_a_plain_eval_and_the_model_loads_once(digits, monkeypatch):
    import vmamba_cli.evaluate as evaluate_module

    data, first, _ = digits
    real_load = evaluate_module.load_model
    loads = []
    monkeypatch.setattr(evaluate_module, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    sweep = evaluate_resolutions(data, weights=first, resolutions=SIZES, device="cpu", workers=0, crop_pct=1.0)
    assert len(loads) == 1
    assert sweep.resolutions == SIZES and sweep.label == "first" and sweep.preset_resolution == 224
    for size, result in zip(SIZES, sweep.results):
        plain = evaluate(data, weights=first, resolution=size, crop_pct=1.0, device="cpu", workers=0)
        assert (result.resolution, result.crop_pct) == (size, 1.0)
        assert (result.correct_top1, result.correct_top5, result.num_images) == \
               (plain.correct_top1, plain.correct_top5, plain.num_images)
        assert result.loss == pytest.approx(plain.loss, rel=1e-6)
    # The sizes see different pixels: the numbers are not all the same.
    assert len({(r.correct_top1, round(r.loss, 6)) for r in sweep.results}) > 1
    # None: the model's own size, as a plain eval without a resolution.
    own = evaluate_resolutions(data, weights=first, resolutions=[None], device="cpu", workers=0, limit=4)
    assert own.resolutions == [224]


def test_cli_rows_json_and_plot(digits, tmp_path):
    data, first, _ = digits
    out, plot = tmp_path / "res.json", tmp_path / "acc_vs_res.png"
    r = _cli(str(data), "-w", str(first), "--resolution", *map(str, SIZES), "--json", "-o", str(out),
             "--plot", str(plot))
    assert r.exit_code == EXIT_OK, r.output
    doc = json.loads(r.stdout)
    assert doc == json.loads(out.read_text())
    assert doc["labels"] == ["first"] and doc["resolutions"] == SIZES and doc["world_size"] == 1
    assert [row["resolution"] for row in doc["rows"]] == SIZES
    for row in doc["rows"]:
        assert row["label"] == "first" and row["num_images"] == 31
        assert row["top1"] == pytest.approx(100.0 * row["correct_top1"] / row["num_images"])
        assert {"top5", "loss", "images_per_sec", "crop_pct", "failures"} <= set(row)
    assert "top1" not in doc  # several rows: the per-row numbers live in rows only
    for size in SIZES:  # one table row per resolution
        assert any(line.strip().startswith(f"│ {size:>10} │") or f"│ {size} " in line for line in r.stderr.splitlines())
    with Image.open(plot) as im:
        assert im.format == "PNG" and im.size[0] > 300
    # The resolutions may also come as a repeated option, and before DATA_DIR.
    again = _cli("-r", "24", "-r", "32", str(data), "-w", str(first), "--json", "--limit", "5")
    assert again.exit_code == EXIT_OK, again.output
    assert [row["resolution"] for row in json.loads(again.stdout)["rows"]] == [24, 32]


def test_single_resolution_json_keeps_its_shape_and_gains_rows(digits):
    data, first, _ = digits
    r = _cli(str(data), "-w", str(first), "-r", "32", "--json", "--limit", "6")
    assert r.exit_code == EXIT_OK, r.output
    doc = json.loads(r.stdout)
    for key in ("model", "weights", "top1", "top5", "loss", "num_images", "correct_top1", "resolution", "failures"):
        assert key in doc
    assert doc["resolution"] == 32 and doc["num_images"] == 6
    assert len(doc["rows"]) == 1 and doc["rows"][0]["label"] == "first"
    assert {k: v for k, v in doc["rows"][0].items() if k != "label"} == {k: v for k, v in doc.items() if k != "rows"}
    assert "top-1" in r.stderr and "wall time" in r.stderr  # the one-model summary, as before


def test_two_weights_on_one_plot(digits, tmp_path, monkeypatch):
    data, first, second = digits
    r = _cli(str(data), "-w", str(first), "-w", str(second), "-r", "24", "32", "--json",
             "--plot", str(tmp_path / "two.png"), "--limit", "8")
    assert r.exit_code == EXIT_OK, r.output
    doc = json.loads(r.stdout)
    assert doc["labels"] == ["first", "second"] and doc["resolutions"] == [24, 32]
    assert [(row["label"], row["resolution"]) for row in doc["rows"]] == \
           [("first", 24), ("first", 32), ("second", 24), ("second", 32)]
    assert doc["rows"][0]["correct_top1"] != doc["rows"][2]["correct_top1"] or \
           doc["rows"][0]["loss"] != doc["rows"][2]["loss"]  # two different models
    assert (tmp_path / "two.png").exists() and "first" in r.stderr and "second" in r.stderr

    # The figure holds one line per weights file, labelled by its stem.
    import matplotlib.pyplot as plt

    figures = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig) or real_close(fig))
    sweeps = [evaluate_resolutions(data, weights=w, resolutions=[24, 32], device="cpu", workers=0, limit=8)
              for w in (first, second)]
    plot_accuracy_vs_resolution(sweeps, tmp_path / "api.png")
    ax = figures[-1].axes[0]
    assert ax.get_legend_handles_labels()[1] == ["first", "second"]
    assert [list(line.get_xdata()) for line in ax.get_lines() if not line.get_label().startswith("_")] == [[24, 32]] * 2
    assert sweep_document(sweeps)["rows"][3]["correct_top1"] == doc["rows"][3]["correct_top1"]


def test_bad_combinations_are_usage_errors(digits, tmp_path):
    data, first, _ = digits
    r = _cli(str(data), "-w", str(first), "-r", "24", "32", "--predictions", str(tmp_path / "p.csv"))
    assert r.exit_code == EXIT_USAGE and "--predictions" in r.output
    assert not (tmp_path / "p.csv").exists()
    r = _cli(str(data), "-w", str(first), "stray")
    assert r.exit_code == EXIT_USAGE and "stray" in r.output
    r = _cli(str(data), "-w", str(first), "-r", "0", "32")
    assert r.exit_code == EXIT_USAGE and "Invalid value" in r.output
    r = _cli(str(data), "-w", str(first), "-r", "32", "5")  # a size among the positionals is checked too
    assert r.exit_code == EXIT_USAGE and "Invalid value" in r.output


def test_two_processes_give_exactly_the_one_process_rows(digits, tmp_path):
    data, first, _ = digits
    single = sweep_document([evaluate_resolutions(data, weights=first, resolutions=[24, 32], device="cpu",
                                                  workers=0)])
    out = tmp_path / "dist.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "vmamba_cli", "eval", str(data), "-w", str(first), "-r", "24", "32", "--device", "cpu",
           "--batch-size", "4", "--workers", "0", "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["world_size"] == 2
    for mine, ref in zip(doc["rows"], single["rows"], strict=True):
        assert mine["resolution"] == ref["resolution"]
        assert (mine["num_images"], mine["correct_top1"], mine["correct_top5"]) == \
               (ref["num_images"], ref["correct_top1"], ref["correct_top5"])
        assert mine["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert proc.stderr.count("accuracy against resolution") == 1  # one table (rank 0)


def test_write_digits_folder_is_the_training_split(tmp_path):
    import numpy as np

    from vmamba_cli.evaluate import map_classes, scan_image_folder
    from vmamba_cli.train.data import digits_arrays, split_indices, write_digits_folder

    assert write_digits_folder(tmp_path / "val", 16) == 359
    images, labels = digits_arrays(16)
    _, val_idx = split_indices(len(labels), 0.2, 0)
    scan = scan_image_folder(tmp_path / "val", map_classes(tmp_path / "val", 10))
    assert len(scan.samples) == 359
    written = {int(os.path.basename(p)[6:10]): target for p, target in scan.samples}
    assert written == {i: int(labels[i]) for i in val_idx.tolist()}
    index, target = next(iter(written.items()))
    pixels = np.asarray(Image.open(tmp_path / "val" / str(target) / f"digit_{index:04d}.png"))
    assert pixels.shape == (16, 16) and np.array_equal(pixels, images[index, 0].numpy())
    with pytest.raises(ValueError, match="split"):
        write_digits_folder(tmp_path / "x", split="test")


def test_model_runs_pair_models_with_weights_and_label_them_uniquely():
    from vmamba_cli.evaluate import model_runs

    # One --model serves every --weights (and the reverse); otherwise they pair in order.
    runs = model_runs(["vmamba-tiny"], ["a/first.safetensors", "b/second.pth"])
    assert [(r.model, r.weights, r.label) for r in runs] == [
        ("vmamba-tiny", "a/first.safetensors", "first"), ("vmamba-tiny", "b/second.pth", "second")]
    assert [r.model for r in model_runs(["m1", "m2"], ["w.pth"])] == ["m1", "m2"]
    assert [r.label for r in model_runs([None], [None])] == ["vmamba-tiny"]
    assert [r.label for r in model_runs(["vmamba-small"], [None])] == ["vmamba-small"]
    # Colliding stems take their folder, then the whole path.
    assert [r.label for r in model_runs([None], ["run1/best.safetensors", "run2/best.safetensors"])] == [
        "run1/best", "run2/best"]
    assert [r.label for r in model_runs([None], ["x/run/best.pth", "y/run/best.pth"])] == [
        "x/run/best.pth", "y/run/best.pth"]
    with pytest.raises(ValueError, match="2 --model and 3 --weights"):
        model_runs(["m1", "m2"], ["a", "b", "c"])
