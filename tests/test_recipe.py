"""The official training recipe's pieces that timm provides: the RandAugment policy
``rand-m9-mstd0.5-inc1`` (statistics checked against its definition), the rest of the train
transform; fp16 with a GradScaler; the best EMA weights kept beside the best model weights."""

from __future__ import annotations

import json
import random
import statistics
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode

from vmamba_cli.train import load_config, read_metrics, read_state, train
from vmamba_cli.train.data import randaugment_policy, train_transform

# The 15 ops of timm's increasing RandAugment set (timm 0.4.12 ``_RAND_INCREASING_TRANSFORMS``, the
# version the official code pins): no Identity, Invert and SolarizeAdd included.
OFFICIAL_OPS = {"AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
DRAWS = 800


def _photo(size: int = 64) -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((size, size), Image.BICUBIC)


def _randaugment(pipeline):
    return next(t for t in pipeline.transforms if type(t).__name__ == "RandAugment")


class _Recorder:
    """Stands in for one AugmentOp in RandAugment's op list: records that it was chosen, whether it
    acted (its image function ran) and the magnitude its level function received."""

    def __init__(self, op, calls: list):
        self.op, self.calls = op, calls
        aug_fn, level_fn = op.aug_fn, op.level_fn

        def aug(img, *args, **kwargs):
            self.calls[-1]["applied"] = True
            self.calls[-1]["args"] = args
            return aug_fn(img, *args, **kwargs)

        def level(magnitude, hparams):
            self.calls[-1]["magnitude"] = magnitude
            return level_fn(magnitude, hparams)

        op.aug_fn = aug
        if level_fn is not None:
            op.level_fn = level

    def __call__(self, img):
        self.calls.append({"name": self.op.name, "applied": False, "magnitude": None, "args": ()})
        return self.op(img)


def test_policy_string_is_the_official_one():
    assert randaugment_policy() == "rand-m9-mstd0.5-inc1"
    assert randaugment_policy(3, 7, 0.0) == "rand-m7-n3-inc1"


def test_randaugment_statistics_match_rand_m9_mstd05_inc1():
    pipeline = train_transform(64)
    ra = _randaugment(pipeline)
    assert ra.num_layers == 2
    assert {op.name for op in ra.ops} == OFFICIAL_OPS and len(ra.ops) == 15
    for op in ra.ops:
        assert op.prob == 0.5 and op.magnitude == 9 and op.hparams["magnitude_std"] == 0.5
        assert op.kwargs["resample"] == Image.BICUBIC                      # geometric ops: bicubic
        assert tuple(op.kwargs["fillcolor"]) == (124, 116, 104)           # the mean pixel, 8-bit

    calls: list[dict] = []
    ra.ops = [_Recorder(op, calls) for op in ra.ops]
    photo = _photo()
    reference = np.asarray(photo)
    random.seed(0)
    np.random.seed(0)
    no_op, untouched, identity_ops = 0, 0, Counter()
    for _ in range(DRAWS):
        start = len(calls)
        out = np.asarray(ra(photo))
        mine = calls[start:]
        assert len(mine) == 2                                              # two ops chosen per image
        applied = [c["name"] for c in mine if c["applied"]]
        no_op += not applied
        if np.array_equal(out, reference):
            untouched += 1
            identity_ops.update(applied)

    # Each chosen op acts with probability 0.5, so a quarter of the images get no op at all.
    applied_share = sum(c["applied"] for c in calls) / len(calls)
    assert abs(applied_share - 0.5) < 0.05, applied_share
    assert abs(no_op / DRAWS - 0.25) < 0.05, no_op / DRAWS
    # Pixel-identical outputs: those, plus images whose only op was AutoContrast, which leaves a photo
    # that already spans 0..255 unchanged (the issue measured 26% untouched for the official policy).
    assert set(identity_ops) <= {"AutoContrast"}
    assert no_op <= untouched and abs(untouched / DRAWS - 0.25) < 0.1, untouched / DRAWS

    # Ops are chosen uniformly (with replacement) from the 15.
    chosen = Counter(c["name"] for c in calls)
    assert set(chosen) == OFFICIAL_OPS
    expected = 2 * DRAWS / 15
    assert all(abs(n - expected) < 0.35 * expected for n in chosen.values()), chosen

    # Magnitudes ~ N(9, 0.5), clipped to [0, 10].
    magnitudes = [c["magnitude"] for c in calls if c["magnitude"] is not None]
    assert len(magnitudes) > 300
    assert abs(statistics.mean(magnitudes) - 9.0) < 0.1
    assert 0.4 < statistics.stdev(magnitudes) < 0.6
    assert max(magnitudes) <= 10.0 and len(set(magnitudes)) > 100
    # "Increasing" posterize: m9 keeps 1 bit (4 - int(9 / 10 * 4)).
    bits = Counter(c["args"][0] for c in calls if c["name"] == "PosterizeIncreasing" and c["applied"])
    assert bits.most_common(1)[0][0] == 1 and set(bits) <= {0, 1, 2}


def test_train_transform_is_the_official_timm_pipeline():
    pipeline = train_transform(224)
    names = [type(t).__name__ for t in pipeline.transforms]
    assert names == ["_ToPIL", "RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "RandAugment",
                     "MaybeToTensor", "Normalize", "RandomErasing"]  # no ColorJitter beside RandAugment
    crop = pipeline.transforms[1]
    assert crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert crop.interpolation == InterpolationMode.BICUBIC and pipeline.transforms[2].p == 0.5
    erasing = pipeline.transforms[-1]
    assert (erasing.probability, erasing.mode, erasing.max_count) == (0.25, "pixel", 1)
    # Without RandAugment, timm's colour jitter (the official 0.4) takes its place.
    plain = [type(t).__name__ for t in train_transform(224, randaugment=False).transforms]
    assert "ColorJitter" in plain and "RandAugment" not in plain
    assert "ColorJitter" not in [type(t).__name__ for t in train_transform(224, randaugment=False, color_jitter=0).transforms]


def test_posterize_at_full_magnitude_gives_black_instead_of_failing():
    ra = _randaugment(train_transform(32))
    posterize = next(op for op in ra.ops if op.name == "PosterizeIncreasing")
    assert posterize.level_fn(10.0, posterize.hparams) == (0,)   # the top of the magnitude range
    photo = _photo(32)
    black = posterize.aug_fn(photo, 0)
    assert black.mode == photo.mode and black.size == photo.size and not np.asarray(black).any()
    one_bit = np.asarray(posterize.aug_fn(photo, 1))
    assert set(np.unique(one_bit)) <= {0, 128} and np.array_equal(np.asarray(posterize.aug_fn(photo, 8)), np.asarray(photo))


@pytest.mark.parametrize("size", [16, 32])
def test_train_transform_works_on_digit_sized_tensors_and_files(size, tmp_path):
    from torchvision import tv_tensors

    from vmamba_cli.data import load_image
    from vmamba_cli.train.data import digits_arrays

    images, _ = digits_arrays(size)
    transform = train_transform(size)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    outs = [transform(tv_tensors.Image(images[i])) for i in range(40)]
    assert all(o.shape == (3, size, size) and o.dtype == torch.float32 and torch.isfinite(o).all() for o in outs)
    assert len({o.sum().item() for o in outs}) == 40                       # random, not constant
    path = tmp_path / "digit.png"
    Image.fromarray(images[0].permute(1, 2, 0).numpy()).save(path)
    assert transform(load_image(path)).shape == (3, size, size)


# ------------------------------------------------------------------------------------------------
# Precision and EMA checkpoints
# ------------------------------------------------------------------------------------------------

TINY = {
    "model_config": {"dims": [16, 32, 64], "depths": [1, 1, 1], "drop_path_rate": 0.0},
    "image_size": 16, "batch_size": 32, "threads": 1, "workers": 0, "val_fraction": 0.1,
    "scan_backend": "torch", "subset": 64,
}


def _fp16_autocast_runs_on_cpu() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.nn.functional.conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)).sum().item()
        torch.amp.GradScaler("cpu")
    except (RuntimeError, TypeError) as exc:  # older PyTorch: no fp16 CPU autocast / CPU GradScaler
        pytest.skip(f"fp16 autocast or GradScaler unsupported on this CPU build ({exc})")
    return True


def test_fp16_trains_with_a_grad_scaler_and_resumes_it(tmp_path):
    _fp16_autocast_runs_on_cpu()
    cfg = load_config("digits", {**TINY, "epochs": 1, "amp": "fp16", "output": str(tmp_path / "fp16")})
    summary = train(cfg, progress=False)
    assert summary["status"] == "completed" and summary["global_step"] == 2
    resolved = json.loads((tmp_path / "fp16" / "config.json").read_text())["derived"]
    assert resolved["amp"] == "float16" and resolved["grad_scaler"] is True
    state = read_state(tmp_path / "fp16" / "last.state.safetensors")
    scaler = state["scaler"]
    assert scaler and scaler["scale"] > 0 and scaler["_growth_tracker"] >= 0   # saved for --resume
    assert all(np.isfinite(r["train_loss"]) for r in read_metrics(tmp_path / "fp16"))
    # float32 runs have no scaler.
    plain = load_config("digits", {**TINY, "epochs": 1, "amp": "none", "output": str(tmp_path / "fp32")})
    train(plain, progress=False)
    assert read_state(tmp_path / "fp32" / "last.state.safetensors")["scaler"] is None
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["derived"]["grad_scaler"] is False


def test_best_ema_weights_are_kept_and_reported(tmp_path):
    from safetensors.torch import load_file

    from vmamba_cli.weights import load_model, read_metadata

    cfg = load_config("digits", {**TINY, "epochs": 3, "ema_decay": 0.5, "output": str(tmp_path / "run")})
    summary = train(cfg, progress=False)
    run = tmp_path / "run"
    records = read_metrics(run)
    ema_top1 = [r["ema_top1"] for r in records]
    best_epoch = ema_top1.index(max(ema_top1)) + 1                         # the first epoch reaching the best
    assert summary["best_ema_top1"] == max(ema_top1) and summary["best_ema_epoch"] == best_epoch
    top1 = [r["top1"] for r in records]
    assert summary["best_top1"] == max(top1) and summary["best_epoch"] == top1.index(max(top1)) + 1
    assert (run / "best_ema.safetensors").exists() and "best_ema.safetensors" in summary["checkpoints"]
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["best_ema_epoch"] == best_epoch and on_disk["best_ema_top1"] == summary["best_ema_top1"]

    meta = read_metadata(run / "best_ema.safetensors")
    assert meta["epoch"] == best_epoch and meta["weights"] == "ema" and meta["top1"] == max(ema_top1)
    # The file holds the EMA weights as the model's own: eval/predict use them without --ema.
    tensors = load_file(str(run / "best_ema.safetensors"))
    assert not any(k.startswith("ema.") for k in tensors)
    if best_epoch == len(records):  # then they equal the last EMA weights
        last = load_file(str(run / "last.safetensors"))
        for key, value in tensors.items():
            assert torch.equal(value, last[f"ema.{key}"]), key
    loaded = load_model(weights=run / "best_ema.safetensors")
    assert loaded.class_names == [str(i) for i in range(10)]
    # The best-EMA position survives a resume (it is in the state file).
    assert read_state(run / "last.state.safetensors")["best_ema"] == {"top1": max(ema_top1), "epoch": best_epoch}


def test_no_best_ema_without_ema(tmp_path):
    summary = train(load_config("digits", {**TINY, "epochs": 1, "ema": False, "output": str(tmp_path / "r")}),
                    progress=False)
    assert not (tmp_path / "r" / "best_ema.safetensors").exists()
    assert summary["best_ema_top1"] is None and summary["best_ema_epoch"] is None


def test_state_files_without_the_new_settings_resume_with_what_they_did(tmp_path):
    from vmamba_cli.train import config_for_resume
    from vmamba_cli.train.state import STATE_FILE, STATE_KEYS, write_state

    cfg = load_config("imagenet", {"data": "digits", "output": str(tmp_path / "old")})
    saved = cfg.to_dict()
    del saved["color_jitter"], saved["randaugment_mstd"]  # a state file from before these settings
    (tmp_path / "old").mkdir()
    # Only the config matters here; the other parts a state file must hold are left empty.
    write_state(tmp_path / "old" / STATE_FILE, {**{key: {} for key in STATE_KEYS}, "config": saved})
    resumed = config_for_resume(tmp_path / "old")
    assert (resumed.color_jitter, resumed.randaugment_mstd) == (0.0, 0.0)
    assert resumed.randaugment and resumed.lr == cfg.lr


def test_first_run_in_a_fresh_process_draws_like_the_next(tmp_path):
    # Building the data imports scikit-learn and timm lazily, and with them rich, whose import draws
    # from Python's `random`; the augmentations (timm's, on that RNG) must not depend on it.
    script = f"""
import json, sys
from vmamba_cli.train import load_config, train
settings = json.loads({json.dumps(json.dumps({**TINY, "epochs": 1, "randaugment": True, "random_erasing": 0.25,
                                                "crop_scale": [0.5, 1.0]}))})
hashes = [train(load_config("digits", {{**settings, "output": sys.argv[1] + name}}), progress=False)
          ["weights_sha256_per_rank"][0] for name in ("/a", "/b")]
print(json.dumps(hashes))
"""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, second = json.loads(proc.stdout.strip().splitlines()[-1])
    assert first == second
