"""`vmamba train`: recipe pieces, exact resume, Ctrl-C, NaN handling, real learning on digits, DDP."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vmamba_cli.model import VMambaConfig, VSSM
from vmamba_cli.train import (STATE_FILE, TrainConfig, TrainingDiverged, apply_overrides, config_for_resume,
                              load_config, parse_assignment, read_metrics, read_state, train)
from vmamba_cli.train.data import (MixupCutmix, ResumableDistributedSampler, digits_arrays, image_folder_samples,
                                   train_transform)
from vmamba_cli.train.schedule import ModelEma, WarmupCosineSchedule, no_decay_names, scale_lr, weight_decay_groups

# A tiny VMamba on 16x16 digits: a few seconds per epoch on one CPU thread.
TINY = {
    "model_config": {"dims": [16, 32, 64], "depths": [1, 1, 1], "drop_path_rate": 0.0},
    "image_size": 16, "batch_size": 32, "threads": 1, "workers": 0, "val_fraction": 0.1,
    "scan_backend": "torch",  # bit-exact comparisons need a deterministic backward
}


def tiny_config(tmp_path: Path, name: str = "run", **changes) -> TrainConfig:
    return load_config("digits", {**TINY, "output": str(tmp_path / name), **changes})


def weights_of(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "last.safetensors"))


def comparable(records: list[dict]) -> list[dict]:
    """Metrics without wall-clock fields."""
    timing = {"images_per_s", "train_time_s", "epoch_time_s"}
    return [{k: v for k, v in r.items() if k not in timing} for r in records]


# ------------------------------------------------------------------------------------------------
# Recipe pieces
# ------------------------------------------------------------------------------------------------

def test_warmup_cosine_schedule_follows_the_recipe():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1.0)
    base, warm, low = scale_lr(5e-4, 1024), scale_lr(5e-7, 1024), scale_lr(5e-6, 1024)
    assert base == pytest.approx(1e-3) and warm == pytest.approx(1e-6) and low == pytest.approx(1e-5)
    sched = WarmupCosineSchedule(opt, base_lr=base, warmup_lr=warm, min_lr=low, warmup_steps=10, total_steps=110)
    lrs = []
    for _ in range(120):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs[0] == pytest.approx(warm)
    assert lrs[5] == pytest.approx(warm + 5 * (base - warm) / 10)
    assert lrs[10] == pytest.approx(base)
    assert lrs[60] == pytest.approx(low + 0.5 * (base - low) * (1 + math.cos(math.pi * 50 / 100)))
    assert lrs[110] == pytest.approx(low) and lrs[119] == pytest.approx(low)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11]))            # rising warm-up
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111]))       # falling cosine
    restored = WarmupCosineSchedule(opt, base_lr=base, warmup_lr=warm, min_lr=low, warmup_steps=10, total_steps=110)
    restored.load_state_dict({"step_index": 37})
    assert opt.param_groups[0]["lr"] == pytest.approx(lrs[37])


def test_weight_decay_groups_are_the_official_ones():
    model = VSSM(VMambaConfig(dims=(16, 32), depths=(1, 1), num_classes=5))
    groups = weight_decay_groups(model, 0.05)
    decayed = {id(p) for p in groups[0]["params"]}
    names = dict(model.named_parameters())
    skip = set(no_decay_names(model))
    block = "layers.0.blocks.0.op."
    # 2-D scan parameters are decayed, as in the official recipe; Ds (1-D), biases and norms are not.
    for key in ("A_logs", "dt_projs_bias", "x_proj_weight", "dt_projs_weight"):
        assert id(names[block + key]) in decayed
    assert id(names[block + "Ds"]) not in decayed
    assert id(names["classifier.head.bias"]) not in decayed
    assert id(names["classifier.norm.weight"]) not in decayed
    assert id(names["classifier.head.weight"]) in decayed
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert {id(names[n]) for n in skip} == {id(p) for p in groups[1]["params"]}
    assert len(decayed) + len(skip) == len(names)


def test_ema_is_the_exponential_average_of_every_step():
    model = torch.nn.Linear(3, 2)
    ema = ModelEma(model, decay=0.9)
    expected = model.weight.detach().clone()
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model)
        expected = 0.9 * expected + 0.1 * model.weight.detach()
    assert torch.allclose(ema.module.weight, expected, atol=1e-6)


def test_mixup_cutmix_fold_label_smoothing_into_soft_targets():
    torch.manual_seed(0)
    images = torch.rand(8, 3, 16, 16)
    labels = torch.arange(8) % 4
    plain = MixupCutmix(4, mixup_alpha=0, cutmix_alpha=0, label_smoothing=0.1)
    out, targets = plain(images, labels)
    assert torch.equal(out, images)
    assert torch.allclose(targets, torch.nn.functional.one_hot(labels, 4) * 0.9 + 0.025)
    mixer = MixupCutmix(4, mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, label_smoothing=0.1)
    for _ in range(5):
        mixed, soft = mixer(images.clone(), labels)
        assert not torch.equal(mixed, images)
        assert torch.allclose(soft.sum(1), torch.ones(8))
        assert soft.min() >= 0.025 - 1e-6            # smoothing floor s / C on every class
        own = soft[torch.arange(8), labels]
        assert (own > 0.025 + 1e-6).all()            # each sample keeps part of its own label


def test_train_transform_is_the_recipe_pipeline():
    from torchvision.transforms import InterpolationMode

    transform = train_transform(32)
    kinds = [type(t).__name__ for t in transform.transforms]
    for kind in ("RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "RandAugment", "Normalize",
                 "RandomErasing"):
        assert kind in kinds
    crop = transform.transforms[kinds.index("RandomResizedCropAndInterpolation")]
    assert crop.scale == (0.08, 1.0) and crop.interpolation == InterpolationMode.BICUBIC
    ra = transform.transforms[kinds.index("RandAugment")]
    assert (ra.num_layers, ra.ops[0].magnitude) == (2, 9)
    assert transform.transforms[kinds.index("RandomErasing")].probability == 0.25
    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    out = transform(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_digits_data_is_real_and_split_is_seeded():
    images, labels = digits_arrays(32)
    assert images.shape == (1797, 3, 32, 32) and images.dtype == torch.uint8
    assert sorted(torch.bincount(labels).tolist())[0] >= 170
    assert torch.equal(images[:, 0], images[:, 2])
    a, b = load_config("digits", {}), load_config("digits", {"seed": 5})
    assert a.split_seed == b.split_seed == 0  # the held-out set does not move with the training seed


def test_resumable_sampler_partitions_like_distributed_sampler():
    data = list(range(21))
    full = [list(ResumableDistributedSampler(data, num_replicas=2, rank=r, seed=3)) for r in (0, 1)]
    for s in full:
        assert len(s) == 11
    assert set(full[0]) | set(full[1]) == set(data)
    sampler = ResumableDistributedSampler(data, num_replicas=2, rank=1, seed=3)
    sampler.set_epoch(0, start=4)
    assert list(sampler) == full[1][4:]
    sampler.set_epoch(1)
    assert list(sampler) != full[1]  # reshuffled per epoch


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------

def test_config_file_tables_and_overrides(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('model = "vmamba-small"\n[optim]\nepochs = 7\nlr = 1e-3\n[model_config]\ndepths = [1, 1, 1, 1]\n'
                    '[augment]\nmixup = 0.0\n')
    cfg = load_config(path, {"batch_size": 8, "model_config.dims": [8, 16, 32, 64]})
    assert (cfg.model, cfg.epochs, cfg.lr, cfg.mixup, cfg.batch_size) == ("vmamba-small", 7, 1e-3, 0.0, 8)
    assert cfg.model_config == {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}
    assert cfg.cutmix == 1.0 and cfg.weight_decay == 0.05  # untouched recipe defaults
    # A model flag selects a whole registered architecture: the file's overrides are dropped.
    assert load_config(path, {"model": "vmamba-base"}).model_config == {}
    with pytest.raises(ValueError, match="unknown training setting 'epoch'.*epochs"):
        load_config(path, {"epoch": 3})
    with pytest.raises(ValueError, match="batch_size: expected an integer"):
        load_config(path, {"batch_size": "many"})
    assert parse_assignment("model_config.depths=[1,2]") == ("model_config.depths", [1, 2])
    assert parse_assignment("amp=bf16") == ("amp", "bf16")
    official = load_config("imagenet", {"data": str(tmp_path)})
    assert official == apply_overrides(TrainConfig(), {"data": str(tmp_path)})  # the file documents the defaults


# ------------------------------------------------------------------------------------------------
# Exact resume, Ctrl-C, NaN
# ------------------------------------------------------------------------------------------------

def _interrupt_at(global_step: int):
    def hook(info):
        if info.global_step == global_step:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does
    return hook


def test_resume_after_ctrl_c_is_exact(tmp_path):
    # Every random part of the recipe is on, so the RNG states and data order must be restored.
    noisy = dict(epochs=2, subset=64, val_fraction=0.05, hflip=0.5, randaugment=True, random_erasing=0.25,
                 mixup=0.8, cutmix=1.0, crop_scale=(0.5, 1.0), model_config={**TINY["model_config"], "drop_path_rate": 0.2})
    straight = train(tiny_config(tmp_path, "straight", **noisy), progress=False)
    assert straight["status"] == "completed" and straight["global_step"] == 4

    for stop_step, name in ((2, "epoch-boundary"), (3, "mid-epoch")):
        cfg = tiny_config(tmp_path, name, **noisy)
        first = train(cfg, progress=False, hooks=[_interrupt_at(stop_step)])
        assert first["status"] == "interrupted" and "--resume" in first["message"]
        state = read_state(tmp_path / name / STATE_FILE)
        assert state["position"]["global_step"] == stop_step
        assert json.loads((tmp_path / name / "summary.json").read_text())["status"] == "interrupted"
        resumed = train(config_for_resume(tmp_path / name), progress=False)  # `vmamba train --resume RUN`
        assert resumed["status"] == "completed"
        a, b = weights_of(tmp_path / "straight"), weights_of(tmp_path / name)
        assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a)
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs after resume"
        assert comparable(read_metrics(tmp_path / name)) == comparable(read_metrics(tmp_path / "straight"))

    # Running the same command again on a finished run folder continues nothing.
    again = train(tiny_config(tmp_path, "straight", **noisy), progress=False)
    assert again["status"] == "already-complete"
    with pytest.raises(ValueError, match="other settings.*lr"):
        train(tiny_config(tmp_path, "straight", **noisy, lr=0.5), progress=False)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import vmamba_cli.train.loop as train_module

    real_loss = train_module.soft_target_cross_entropy
    calls = {"n": 0}

    def poisoned(logits, targets):
        calls["n"] += 1
        loss = real_loss(logits, targets)
        return loss * float("nan") if calls["n"] > 4 else loss  # epoch 1 = 3 steps, then NaN in epoch 2

    monkeypatch.setattr(train_module, "soft_target_cross_entropy", poisoned)
    cfg = tiny_config(tmp_path, epochs=3, subset=96, ema=False)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 2 step 2.*last good checkpoint.*epoch 1"):
        train(cfg, progress=False)
    run = tmp_path / "run"
    from vmamba_cli.weights import read_metadata

    assert read_metadata(run / "last.safetensors")["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in weights_of(run).values())
    assert read_state(run / STATE_FILE)["position"] == {"epoch": 1, "batches_done": 0, "global_step": 3,
                                                          "world_size": 1}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and "nan" in summary["message"]
    assert len(read_metrics(run)) == 1


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    plain = dict(epochs=1, subset=64, hflip=0.0, randaugment=False, random_erasing=0.0, mixup=0.0, cutmix=0.0,
                 crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), ema=False, val_fraction=0.05)
    big = train(tiny_config(tmp_path, "big", batch_size=32, **plain), progress=False)
    accumulated = train(tiny_config(tmp_path, "accum", batch_size=16, accum_steps=2, **plain), progress=False)
    assert big["effective_batch"] == accumulated["effective_batch"] == 32
    assert big["global_step"] == accumulated["global_step"] == 2
    a, b = weights_of(tmp_path / "big"), weights_of(tmp_path / "accum")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=2e-5, rtol=1e-4), key


# ------------------------------------------------------------------------------------------------
# Learning is real
# ------------------------------------------------------------------------------------------------

def test_tiny_vmamba_learns_digits_above_90_percent(tmp_path):
    cfg = load_config("digits", {"output": str(tmp_path / "learn"), "threads": 1, "epochs": 2, "ema": False,
                                 "image_size": 16, "model_config.depths": [1, 1, 1, 1]})
    summary = train(cfg, progress=False)
    assert summary["best_top1"] >= 90.0, read_metrics(tmp_path / "learn")
    # The held-out images were never trained on: 360 of the 1,797 digits.
    assert "1438 train / 359 held-out" in summary["data"]


# ------------------------------------------------------------------------------------------------
# DDP (two gloo processes) and the CLI
# ------------------------------------------------------------------------------------------------

def test_two_process_ddp_matches_one_process_with_double_batch(tmp_path):
    plain = ["--set", "hflip=0", "--set", "randaugment=false", "--set", "random_erasing=0", "--set", "mixup=0",
             "--set", "cutmix=0", "--set", "crop_scale=[1.0,1.0]", "--set", "crop_ratio=[1.0,1.0]",
             "--set", "val_fraction=0.05", "--set", "ema_decay=0.9", "--set", "model_config.dims=[16,32,64]",
             "--set", "model_config.depths=[1,1,1]", "--image-size", "16", "--epochs", "2", "--subset", "128",
             "--threads", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vmamba_cli", "train", "--data", "digits", "--batch-size", "16", "-o", str(ddp_dir), *plain]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    from typer.testing import CliRunner

    from vmamba_cli.cli import app

    one_dir = tmp_path / "one"
    result = CliRunner().invoke(app, ["train", "--data", "digits", "--batch-size", "32", "-o", str(one_dir), *plain])
    assert result.exit_code == 0, result.output

    ddp_summary = json.loads((ddp_dir / "summary.json").read_text())
    hashes = ddp_summary["weights_sha256_per_rank"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]            # identical weights and EMA on both ranks
    derived = json.loads((ddp_dir / "config.json").read_text())["derived"]
    assert derived["world_size"] == 2 and derived["effective_batch"] == 32
    assert derived["lr"] == pytest.approx(json.loads((one_dir / "config.json").read_text())["derived"]["lr"])
    assert derived["steps_per_epoch"] == 4
    assert [r["images"] for r in read_metrics(ddp_dir)] == [128.0, 128.0]
    # 2 x 16 per step on disjoint halves of the same shuffled order == 1 x 32: same training.
    a, b = weights_of(ddp_dir), weights_of(one_dir)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=2e-5, rtol=1e-4), key
    for x, y in zip(read_metrics(ddp_dir), read_metrics(one_dir)):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)
        assert x["top1"] == pytest.approx(y["top1"], abs=0.6)
        assert x["ema_top1"] == pytest.approx(y["ema_top1"], abs=0.6)


def _write_folder(root: Path, classes=("cat", "dog", "eel"), per_class=6):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 2)):
        for i, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for j in range(count):
                pixels = np.full((20, 24, 3), 60 * i, dtype=np.uint8) + rng.integers(0, 40, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{j}.png")


def test_cli_finetunes_from_pretrained_on_an_image_folder(tmp_path):
    from typer.testing import CliRunner

    from vmamba_cli.cli import app
    from vmamba_cli.weights import load_model, save_model

    _write_folder(tmp_path / "pets")
    source = VSSM(VMambaConfig(dims=(8, 16), depths=(1, 1), num_classes=10))
    save_model(tmp_path / "pre.safetensors", source, class_names=[str(i) for i in range(10)])
    run = tmp_path / "ft"
    result = CliRunner().invoke(app, [
        "train", "--data", str(tmp_path / "pets"), "--pretrained", str(tmp_path / "pre.safetensors"),
        "--num-classes", "3", "--epochs", "1", "-b", "4", "--image-size", "16", "--threads", "1", "-j", "0",
        "-o", str(run), "--no-progress", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["status"] == "completed" and summary["num_classes"] == 3
    for name in ("config.json", "metrics.jsonl", "summary.json", "curves.png", "last.safetensors",
                 "best.safetensors", STATE_FILE):
        assert (run / name).exists(), name
    loaded = load_model(None, run / "last.safetensors")
    assert loaded.class_names == ["cat", "dog", "eel"] and loaded.model.config.num_classes == 3
    # The checkpoint records its preprocessing, so predict / eval use 16 px without flags.
    assert (loaded.preprocess.input_size, loaded.preprocess.crop_pct) == (16, 0.875)
    # The backbone started from the pretrained weights (not a fresh init): the stem moved only by training.
    stem_before = source.state_dict()["patch_embed.0.weight"]
    stem_after = loaded.model.state_dict()["patch_embed.0.weight"]
    assert (stem_after - stem_before).abs().max() < 0.05
    assert json.loads((run / "config.json").read_text())["config"]["pretrained"] == str(tmp_path / "pre.safetensors")
    train_samples, val_samples, names = image_folder_samples(tmp_path / "pets", 0.2, 0)
    assert (len(train_samples), len(val_samples), names) == (18, 6, ["cat", "dog", "eel"])


def test_cli_bad_inputs_are_one_line_errors(tmp_path):
    from typer.testing import CliRunner

    from vmamba_cli.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "nowhere"), "-o", str(tmp_path / "r")])
    assert result.exit_code == 1 and "nowhere: no such folder" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["train", "--set", "warmup=3"])
    assert result.exit_code == 1 and "unknown training setting 'warmup'" in result.output
    result = runner.invoke(app, ["train", "--resume", str(tmp_path)])
    assert result.exit_code == 1 and "nothing to resume" in result.output
    result = runner.invoke(app, ["train", "--data", "digits", "--print-config", "--epochs", "4"])
    assert result.exit_code == 0 and json.loads(result.stdout)["epochs"] == 4
