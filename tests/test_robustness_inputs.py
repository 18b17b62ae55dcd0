"""Hostile and broken inputs to predict, eval and train: one line per bad input, the rest still done.

Generated here: decompression bombs (PNG and GIF headers claiming 100000x100000 / 65535x65535 in a few
bytes), a FIFO named like an image, a dangling symlink, a folder symlink looping back up, truncated,
empty and text-as-image files; bad options and output places; the leftovers of a killed training run.
Every command that could hang on the old code runs in a subprocess with a timeout.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vmamba_cli.cli import app
from vmamba_cli.data import class_subfolders, find_images, load_image
from vmamba_cli.errors import ImageError, ResumeError
from vmamba_cli.model import VMambaConfig, VSSM
from vmamba_cli.predict import predict
from vmamba_cli.weights import save_model

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs and symlinks need a POSIX system")

SMALL = VMambaConfig(dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_classes=3)
CLASSES = ("ant", "bee", "cat")
TIMEOUT_S = 120  # a hang fails the test instead of stalling the suite
MEMORY_HEADROOM = 3 << 30
runner = CliRunner()


# -- generated inputs ------------------------------------------------------------------------------

def png_bomb(width: int, height: int) -> bytes:
    """A valid 8x8 PNG whose IHDR claims ``width`` x ``height`` (CRC fixed): 69 bytes."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)           # IHDR payload starts after 8 + 4 + 4 bytes
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def gif_bomb(width: int, height: int) -> bytes:
    """A GIF whose screen and frame descriptors claim ``width`` x ``height`` (one tiny LZW block)."""
    header = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x4c\x01\x00"
    return header + frame + b"\x3b"


def _good(path: Path, shade: int) -> None:
    Image.new("RGB", (40, 36), (shade, 255 - shade, 90)).save(path)


def make_wild_folder(root: Path) -> tuple[list[Path], dict[Path, str]]:
    """Class folders with two good images each, plus one of every kind of bad input.

    Returns the good files and {bad file: expected words of its error}."""
    good: list[Path] = []
    for i, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for j in range(2):
            path = root / name / f"{j}.{'png' if j else 'jpg'}"
            _good(path, 40 * i + 20 * j)
            good.append(path)
    ant, bee, cat = (root / name for name in CLASSES)
    bad = {
        ant / "bomb.png": "image too large: 100000x100000 (10000000000 pixels)",
        ant / "bomb.gif": "image too large: 65535x65535",
        bee / "pipe.jpg": "not a regular file (named pipe)",
        bee / "gone.png": "dangling symbolic link",
        cat / "empty.jpg": "empty file",
        cat / "notes.jpg": "not an image",
        cat / "cut.png": "unreadable image",
    }
    (ant / "bomb.png").write_bytes(png_bomb(100_000, 100_000))
    (ant / "bomb.gif").write_bytes(gif_bomb(65535, 65535))
    os.mkfifo(bee / "pipe.jpg")
    os.symlink(root / "nowhere.png", bee / "gone.png")
    (cat / "empty.jpg").write_bytes(b"")
    (cat / "notes.jpg").write_text("not a picture\n")
    (cat / "cut.png").write_bytes((ant / "1.png").read_bytes()[:60])
    os.symlink(root, cat / "loop")          # a folder symlink back up the tree
    os.symlink(root, root / "everything")   # a "class folder" that is the data root again
    return good, bad


@pytest.fixture(scope="module")
def wild(tmp_path_factory):
    root = tmp_path_factory.mktemp("wild") / "data"
    good, bad = make_wild_folder(root)
    return root, good, bad


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """Class folders of good images only: what in-process CLI runs read (nothing there can hang)."""
    root = tmp_path_factory.mktemp("clean") / "data"
    for i, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        _good(root / name / "0.png", 60 * i)
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "small.safetensors"
    save_model(path, VSSM(SMALL), class_names=list(CLASSES))
    return path


@contextlib.contextmanager
def memory_headroom(extra: int = MEMORY_HEADROOM):
    """At most ``extra`` more bytes of heap for this process while inside: a command that should refuse
    a huge size before allocating ends in MemoryError if it does not, instead of taking the machine's
    memory. The soft limit is put back on exit."""
    import resource

    with open("/proc/self/status") as f:
        used = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (used + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def run_cli(*args: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                     os.environ.get("PYTHONPATH")]))}
    try:
        return subprocess.run([sys.executable, "-m", "vmamba_cli", *args], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"vmamba {' '.join(args)} hung (killed after {timeout} s)")


def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def load_with_timeout(path: Path, timeout: float = 30.0, **kwargs):
    """load_image in a thread: on a FIFO the old code blocks in open(), which must fail, not hang."""
    outcome: dict = {}

    def target():
        try:
            outcome["image"] = load_image(path, **kwargs)
        except BaseException as exc:  # noqa: BLE001 -- reported to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # a writer that leaves at once: the reader sees EOF
        pytest.fail(f"load_image({path.name}) blocked")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["image"]


# -- load_image and the scanner --------------------------------------------------------------------

def test_each_bad_input_is_one_image_error_with_its_reason(wild):
    root, good, bad = wild
    for path, words in bad.items():
        with pytest.raises(ImageError) as info:
            load_with_timeout(path)
        assert words in str(info.value) and str(info.value).startswith(str(path)), str(info.value)
        assert "\n" not in str(info.value)
    for path, words in ((root / "ant", "is a directory"), (Path(os.devnull), "character device")):
        with pytest.raises(ImageError, match=words):
            load_with_timeout(path)
    assert load_with_timeout(good[0]).size == (40, 36)


def test_pixel_limit_is_checked_from_the_header_and_configurable(wild):
    root, good, _ = wild
    with pytest.raises(ImageError, match=r"image too large: 40x36 \(1440 pixels\), limit 1000 pixels; "
                                         r"raise it with --max-pixels"):
        load_image(good[0], max_pixels=1000)
    assert load_image(good[0], max_pixels=1440).size == (40, 36)
    # Over Pillow's own hard limit (twice its MAX_IMAGE_PIXELS) the size is still read from the header.
    with pytest.raises(ImageError, match=r"100000x100000 \(10000000000 pixels\), limit 89478485 pixels"):
        load_image(root / "ant" / "bomb.png")


def test_folder_symlinks_are_followed_once(wild, tmp_path):
    root, good, bad = wild
    walked = find_images([root])
    assert sorted(walked.files) == sorted(good + list(bad)), "each real file exactly once"
    assert class_subfolders(root) == list(CLASSES), "the symlink to the data root is no class folder"
    # Walking one class folder does not wander into the others through its loop link.
    assert sorted(find_images([root / "cat"]).files) == sorted(p for p in good + list(bad) if p.parent.name == "cat")
    from vmamba_cli.train.data import image_folder_samples

    train, val, names = image_folder_samples(root, 0.25, 0)
    assert names == list(CLASSES) and len(train) + len(val) == len(good) + len(bad)


# -- predict ---------------------------------------------------------------------------------------

def test_predict_json_over_a_hostile_folder_is_complete_and_valid(wild, weights):
    root, good, bad = wild
    result = run_cli("predict", str(root), "-w", str(weights), "--device", "cpu", "--json", "-k", "2")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    document = strict_json(result.stdout)
    assert sorted(p["path"] for p in document["predictions"]) == sorted(map(str, good))
    failures = {f["path"]: f["error"] for f in document["failures"]}
    assert set(failures) == set(map(str, bad))
    for path, words in bad.items():
        assert words in failures[str(path)]
    lines = error_lines(result.stderr)
    assert len(lines) == len(bad) and all(any(str(p) in line for line in lines) for p in bad)


def test_an_exception_in_a_loader_thread_is_that_files_failure(wild, weights, monkeypatch):
    import vmamba_cli.predict as predict_module

    root, good, _ = wild
    original = predict_module.load_image

    def flaky(path, **kwargs):
        if Path(path) == good[1]:
            raise RuntimeError("decoder crashed\nwith a second line")
        return original(path, **kwargs)

    monkeypatch.setattr(predict_module, "load_image", flaky)
    report = predict(good, weights=weights, device="cpu", topk=1, workers=2)
    assert [p.path for p in report.predictions] == [str(p) for p in good if p != good[1]]
    assert [(f.path, f.error) for f in report.failures] == [(str(good[1]), "RuntimeError: decoder crashed with a "
                                                                           "second line")]


def test_non_finite_outputs_are_failures_and_json_stays_strict(wild, weights, tmp_path, capsys):
    root, good, _ = wild
    torch.manual_seed(0)
    model = VSSM(SMALL)
    with torch.no_grad():  # finite weights whose logits overflow float32 to inf
        model.classifier.head.weight.fill_(3e38)
    overflow = tmp_path / "overflow.safetensors"
    save_model(overflow, model)
    report = predict(good[:2], weights=overflow, device="cpu")
    assert report.predictions == [] and len(report.failures) == 2
    assert all("not finite" in f.error for f in report.failures)

    from vmamba_cli.commands._common import print_json

    print_json({"loss": float("nan"), "rows": [1.0, float("inf")]})
    out, err = capsys.readouterr()
    assert strict_json(out) == {"loss": None, "rows": [1.0, None]}
    assert "2 non-finite number(s) written as null" in err and "loss" in err and "rows[1]" in err


# -- eval ------------------------------------------------------------------------------------------

def test_eval_over_a_hostile_folder_counts_each_file_once(wild, weights, tmp_path):
    root, good, bad = wild
    result = run_cli("eval", str(root), "-w", str(weights), "--device", "cpu", "--resolution", "32", "-j", "0",
                     "--json")
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    document = strict_json(result.stdout)
    assert (document["num_images"], document["num_failed"]) == (len(good), len(bad))
    assert document["num_class_folders"] == len(CLASSES)
    assert {f["path"] for f in document["failures"]} == set(map(str, bad))


# -- options and output places, refused before any work --------------------------------------------

# Cheap settings, so that a command the old code did not refuse ends fast instead of doing real work.
QUICK_PROFILE = ["profile", "--resolution", "32", "--iters", "1", "--no-scan-bandwidth", "--device", "cpu"]
QUICK_ERF = ["erf", "--noise", "-n", "1", "--resolution", "32", "--device", "cpu"]
QUICK_TRAIN = ["train", "--data", "digits", "--epochs", "1", "--subset", "64", "--image-size", "16", "--no-progress",
               "--set", "model_config.dims=[8,16,24,32]", "--set", "model_config.depths=[1,1,1,1]"]

HUGE_SIZES = {  # exit 2 before anything is allocated (run under memory_headroom)
    "predict --resolution 100000": ["predict", "{image}", "-w", "{weights}", "--resolution", "100000"],
    "eval --resolution 100000": ["eval", "{root}", "-w", "{weights}", "--resolution", "100000", "-j", "0"],
    "train --image-size 100000": [*QUICK_TRAIN, "--image-size", "100000", "--output", "{tmp}/huge"],
}

USAGE_ERRORS = {  # exit 2: range checks of the command line
    "predict --max-pixels 0": ["predict", "{image}", "-w", "{weights}", "--max-pixels", "0"],
    "eval --resolution 7": ["eval", "{root}", "-w", "{weights}", "--resolution", "7", "-j", "0"],
    "train --subset 0": [*QUICK_TRAIN, "--subset", "0", "--output", "{tmp}/subset0"],
    "train --subset -1": [*QUICK_TRAIN, "--subset", "-1", "--output", "{tmp}/subset-1"],
    "train --threads -1": [*QUICK_TRAIN, "--threads", "-1", "--output", "{tmp}/threads"],
    "profile --warmup -1": [*QUICK_PROFILE, "--warmup", "-1"],
}

ONE_LINE_ERRORS = {  # exit 1, one line naming the problem, before any work
    "predict --device tpu": (["predict", "{image}", "-w", "{weights}", "--device", "tpu"], "unknown device 'tpu'"),
    "predict --device ''": (["predict", "{image}", "-w", "{weights}", "--device", ""], "unknown device ''"),
    "predict --device meta": (["predict", "{image}", "-w", "{weights}", "--device", "meta"], "unknown device 'meta'"),
    "eval --device tpu": (["eval", "{root}", "-w", "{weights}", "--device", "tpu"], "unknown device 'tpu'"),
    "eval --output folder": (["eval", "{root}", "-w", "{weights}", "-r", "32", "-j", "0", "--output", "{tmp}"],
                             "{tmp}: is a folder"),
    "eval --output /proc": (["eval", "{root}", "-w", "{weights}", "-r", "32", "-j", "0", "--output",
                             "/proc/vmamba/out.json"], "/proc/vmamba/out.json: cannot write in /proc"),
    "eval --predictions under a file": (["eval", "{root}", "-w", "{weights}", "-r", "32", "-j", "0", "--predictions",
                                         "{tmp}/plain.txt/p.csv"],
                                        "{tmp}/plain.txt/p.csv: cannot create: {tmp}/plain.txt is not a folder"),
    "erf --out /proc": ([*QUICK_ERF, "--out", "/proc/erf.png"], "/proc/erf.png: cannot write in /proc"),
    "profile --plot folder": ([*QUICK_PROFILE, "--plot", "{tmp}"], "{tmp}: is a folder"),
    "train --output /proc": ([*QUICK_TRAIN, "--output", "/proc/vmamba-run"], "/proc/vmamba-run: cannot write in /proc"),
    "train --output file": ([*QUICK_TRAIN, "--output", "{tmp}/plain.txt"],
                            "{tmp}/plain.txt: exists and is not a folder"),
}


def _fill(args: list[str], **values) -> list[str]:
    return [a.format(**values) for a in args]


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_out_of_range_options_are_usage_errors(case, clean, weights, tmp_path):
    args = _fill(USAGE_ERRORS[case], image=str(clean / CLASSES[0] / "0.png"), root=str(clean), weights=str(weights),
                 tmp=str(tmp_path))
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "Invalid value" in result.stderr, result.output  # not "No such option"
    assert "Traceback" not in result.output and result.stdout == ""


@pytest.mark.parametrize("case", list(HUGE_SIZES))
def test_huge_input_sizes_are_refused_before_allocating(case, clean, weights, tmp_path):
    args = _fill(HUGE_SIZES[case], image=str(clean / CLASSES[0] / "0.png"), root=str(clean), weights=str(weights),
                 tmp=str(tmp_path))
    with memory_headroom():
        result = runner.invoke(app, args)
    assert result.exit_code == 2 and "Invalid value" in result.stderr, result.output
    assert "Traceback" not in result.output and "4096" in result.stderr


@pytest.mark.parametrize("case", list(ONE_LINE_ERRORS))
def test_bad_devices_and_output_places_are_one_line_before_work(case, clean, weights, tmp_path):
    (tmp_path / "plain.txt").write_text("x")
    values = dict(image=str(clean / CLASSES[0] / "0.png"), root=str(clean), weights=str(weights), tmp=str(tmp_path))
    args, message = ONE_LINE_ERRORS[case]
    result = runner.invoke(app, _fill(args, **values))
    lines = error_lines(result.stderr)
    assert result.exit_code == 1 and len(lines) == 1 and message.format(**values) in lines[0], result.output
    assert "Traceback" not in result.output and result.stdout == ""


def test_convert_checks_its_destination_and_weights_list_a_corrupt_hash_record(weights, tmp_path, monkeypatch):
    result = runner.invoke(app, ["convert", str(weights), "/proc/vmamba.safetensors"])
    lines = error_lines(result.stderr)
    assert result.exit_code == 1 and lines == ["error: /proc/vmamba.safetensors: cannot write in /proc "
                                               "(No such file or directory)"], result.output
    monkeypatch.setenv("VMAMBA_HOME", str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "sha256.json").write_text('{"vssm": {"sha256": ')
    result = runner.invoke(app, ["weights", "list"])
    lines = error_lines(result.stderr)
    assert result.exit_code == 1 and len(lines) == 1 and "sha256.json: unreadable hash record" in lines[0]
    assert "Traceback" not in result.output


def test_a_forward_that_cannot_fit_in_memory_is_refused_before_it_runs(clean, weights, monkeypatch, tmp_path):
    monkeypatch.setattr("vmamba_cli.runtime.available_memory", lambda device: 1 << 20)
    for args in (["predict", str(clean), "-w", str(weights), "--device", "cpu"],
                 ["eval", str(clean), "-w", str(weights), "--device", "cpu", "-j", "0"],
                 [*QUICK_TRAIN, "--output", str(tmp_path / "run")]):
        result = runner.invoke(app, args)
        lines = error_lines(result.stderr)
        assert result.exit_code == 1 and len(lines) == 1, result.output
        assert "GiB available; lower --" in lines[0] and "--batch-size" in lines[0]
        assert "image(s) predicted" not in result.stderr and "top-1" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_bad_training_image_read_in_a_worker_is_one_line(tmp_path):
    data = tmp_path / "data"
    for i, name in enumerate(CLASSES[:2]):
        (data / name).mkdir(parents=True)
        for j in range(8):
            _good(data / name / f"{j}.png", 20 * j + 100 * i)
    os.mkfifo(data / CLASSES[0] / "pipe.png")
    result = run_cli(*QUICK_TRAIN, "--data", str(data), "--output", str(tmp_path / "run"), "--workers", "2",
                     "--batch-size", "4", "--set", "mixup=0", "--set", "cutmix=0")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert error_lines(result.stderr) == [f"error: {data / CLASSES[0] / 'pipe.png'}: not a regular file (named pipe)"]


# -- training leftovers ----------------------------------------------------------------------------

TINY = {"model_config": {"dims": [16, 32, 64], "depths": [1, 1, 1], "drop_path_rate": 0.0}, "image_size": 16,
        "batch_size": 32, "threads": 1, "workers": 0, "val_fraction": 0.1, "scan_backend": "torch", "epochs": 1,
        "subset": 64}


def test_training_cleans_a_killed_runs_leftovers(tmp_path):
    from vmamba_cli.train import STATE_FILE, config_for_resume, load_config, read_metrics, train

    run = tmp_path / "run"
    run.mkdir()
    stale = [run / ".config.json.k3x_9a0b.tmp", run / ".best.safetensors.abcdefgh.tmp",
             run / ".last.state.safetensors.0123abcd.tmp"]
    kept = [run / ".notes.txt.abcdefgh.tmp", run / "mine.tmp"]
    for path in stale + kept:
        path.write_bytes(b"partial")
    # The first state write was killed: metrics.jsonl has epoch 1, there is no state to resume.
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "top1": 0.0}) + "\n")
    summary = train(load_config("digits", {**TINY, "output": str(run)}), progress=False, log=lambda m: None)
    assert summary["status"] == "completed"
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert [r["epoch"] for r in read_metrics(run)] == [1]

    # A partial last line (an append cut short) is dropped on resume; epoch 2 follows epoch 1 once.
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_lo')
    train(config_for_resume(run, {"epochs": 2}), progress=False, log=lambda m: None)
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2]

    # A corrupt JSON skeleton in the state file names the file.
    from safetensors import safe_open
    from safetensors.torch import save_file

    state_path = run / STATE_FILE
    with safe_open(str(state_path), framework="pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    metadata["state"] = metadata["state"].replace(",", "", 1)
    save_file(tensors, str(state_path), metadata=metadata)
    with pytest.raises(ResumeError, match=r"last\.state\.safetensors: corrupt JSON in training state: Expecting"):
        config_for_resume(run)
    result = runner.invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 1 and len(error_lines(result.stderr)) == 1
    assert f"{state_path}: corrupt JSON in training state" in result.stderr and "Traceback" not in result.output
