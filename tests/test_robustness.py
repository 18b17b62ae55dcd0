"""Damaged, hostile and odd inputs on the checkpoint and download side end in one clear line.

Each class of input found by ``benchmarks/fuzz_inputs.py`` has a small generated sample here:
safetensors files whose header length begins with byte 0x80 (valid, truncated, bit-flipped), zips
that are no torch archive, short ``.pth`` files, FIFOs and folders named as checkpoints, malformed
``config`` metadata, NaN / Inf weights, and, on a loopback server, trickling and silent downloads,
redirect loops and the temporary files of a killed download.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import struct
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from vmamba_cli.cli import app
from vmamba_cli.model import VMambaConfig, VSSM
from vmamba_cli.weights import CheckpointError, DownloadError, load_model, read_state_dict, save_model
from vmamba_cli.weights import download as download_module
from vmamba_cli.weights import loading

SMALL = VMambaConfig(dims=(8, 16), depths=(1, 1), num_classes=2, d_state=1)


def _one_line(err: BaseException, path) -> str:
    text = str(err)
    assert "\n" not in text, text
    assert str(path) in text, text
    return text


def _header_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return VSSM(SMALL).eval()


@pytest.fixture(scope="module")
def x80_file(tmp_path_factory, small_model):
    """A valid file of ours (weights + EMA under ``ema.``, as `vmamba train` writes) whose header
    length's low byte is 0x80; metadata padding moves the length."""
    root = tmp_path_factory.mktemp("x80")
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in small_model.state_dict().items()}
    both = {**small_model.state_dict(), **{f"ema.{k}": v for k, v in ema.items()}}
    path = root / "last.safetensors"
    for pad in range(1, 400):
        save_model(path, small_model, class_names=["a", "b"], extra={"pad": "x" * pad}, state_dict=both)
        if _header_length(path) & 0xFF == 0x80:
            return path, ema
    raise AssertionError("no padding gives a header length ending in 0x80")


def _in_child(target, *args, timeout: float = 60.0):
    """Run ``target(*args)`` in a forked process and return its result; fail if it does not finish.

    A blocking open() of a FIFO inside native code (safetensors) cannot be interrupted from Python,
    so the only bound that always holds is a separate process."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)

    def run():
        try:
            send.send(("ok", target(*args)))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            send.send(("error", (type(exc).__name__, str(exc))))

    child = context.Process(target=run, daemon=True)
    child.start()
    ready = receive.poll(timeout)
    if not ready:
        child.kill()
        child.join()
        raise AssertionError(f"{target.__name__}{args} still running after {timeout:g} s")
    result = receive.recv()
    child.join()
    return result


def _cli(args):
    """Run the CLI in-process; return (exit code, stderr lines). A traceback fails the test."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"the command raised {result.exception!r}") from result.exception
    return result.exit_code, [line for line in result.stderr.splitlines() if line.strip()]


def _assert_cli_one_line(args, path):
    code, lines = _cli(args)
    assert code == 1, lines
    assert len(lines) == 1 and lines[0].startswith("error:") and str(path) in lines[0], lines
    return lines[0]


# ------------------------------------------------------------------------------------------------
# Sniffing and readers
# ------------------------------------------------------------------------------------------------

def test_valid_file_with_0x80_header_length_loads_with_its_ema(x80_file):
    path, ema = x80_file
    assert path.read_bytes()[0] == 0x80
    loaded = load_model(None, path, ema=True)
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, ema[key]), key
    assert load_model(None, path).class_names == ["a", "b"]


@pytest.mark.parametrize("cut", ["9 bytes", "100 bytes", "half", "all but 1 byte"])
def test_truncated_0x80_file_is_one_line(x80_file, tmp_path, cut):
    data = x80_file[0].read_bytes()
    keep = {"9 bytes": 9, "100 bytes": 100, "half": len(data) // 2, "all but 1 byte": len(data) - 1}[cut]
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[:keep])
    with pytest.raises(CheckpointError) as err:
        read_state_dict(bad)
    _one_line(err.value, bad)


@pytest.mark.parametrize("offset", [0, 3, 8, 9])
def test_bit_flipped_0x80_header_is_one_line(x80_file, tmp_path, offset):
    data = bytearray(x80_file[0].read_bytes())
    data[offset] ^= 0x21
    bad = tmp_path / "flip.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        read_state_dict(bad, ema=True)
    _one_line(err.value, bad)


def test_damaged_0x80_file_through_predict_is_one_line(x80_file, tmp_path):
    data = x80_file[0].read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    _assert_cli_one_line(["predict", "--weights", bad, "--device", "cpu", tmp_path / "none.png"], bad)


@pytest.mark.parametrize("name", ["other.safetensors", "other.pth"])
def test_zip_that_is_no_torch_archive_is_one_line(tmp_path, name):
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello " * 100)
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    _one_line(err.value, path)
    if path.suffix == ".safetensors":  # the CLI once: convert builds vmamba-tiny before it reads the file
        _assert_cli_one_line(["convert", path, tmp_path / "out.safetensors", "--model", "vmamba-tiny"], path)
        assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("size", [1, 8, 9, 80, 200])
def test_short_pth_is_one_line(tmp_path, small_model, size):
    good = tmp_path / "good.pth"
    torch.save({"model": small_model.state_dict()}, good)
    short = tmp_path / "short.pth"
    short.write_bytes(good.read_bytes()[:size])
    with pytest.raises(CheckpointError) as err:
        read_state_dict(short)
    _one_line(err.value, short)


def test_short_legacy_pickle_is_one_line(tmp_path, small_model):
    good = tmp_path / "legacy.pth"
    torch.save({"model": small_model.state_dict()}, good, _use_new_zipfile_serialization=False)
    short = tmp_path / "short.pth"
    short.write_bytes(good.read_bytes()[:300])
    with pytest.raises(CheckpointError) as err:
        read_state_dict(short)
    _one_line(err.value, short)


def _error_of(function, path):
    try:
        function(path)
    except CheckpointError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("name", ["x.pth", "x.safetensors"])
@pytest.mark.parametrize("function", [lambda path: load_model(None, path), read_state_dict, loading.read_metadata],
                         ids=["load_model", "read_state_dict", "read_metadata"])
def test_fifo_named_as_checkpoint_is_refused_without_opening(tmp_path, name, function):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    status, message = _in_child(_error_of, function, fifo, timeout=60)
    assert status == "ok" and message is not None, message
    assert "FIFO" in message and str(fifo) in message and "\n" not in message


def test_fifo_named_as_checkpoint_through_convert_does_not_hang(tmp_path):
    fifo = tmp_path / "x.pth"
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, "-m", "vmamba_cli", "convert", str(fifo), str(tmp_path / "o.safetensors"),
                           "--model", "vmamba-tiny"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(fifo) in lines[0] and "FIFO" in lines[0], lines


def test_directory_and_dangling_link_named_as_checkpoint(tmp_path):
    folder = tmp_path / "folder.pth"
    folder.mkdir()
    link = tmp_path / "link.safetensors"
    link.symlink_to(tmp_path / "missing.safetensors")
    for path, words in ((folder, "directory"), (link, "dangling")):
        with pytest.raises(CheckpointError) as err:
            read_state_dict(path)
        assert words in _one_line(err.value, path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_checkpoint_is_one_line(tmp_path, small_model):
    path = tmp_path / "locked.pth"
    torch.save({"model": small_model.state_dict()}, path)
    path.chmod(0)
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    assert "permission" in _one_line(err.value, path)


def test_unreadable_checkpoint_is_refused_by_the_access_check(tmp_path, small_model, monkeypatch):
    # Root bypasses file modes, so the check itself is exercised: whatever os.access reports for
    # this file decides, before any open().
    path = tmp_path / "locked.pth"
    torch.save({"model": small_model.state_dict()}, path)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == path else real_access(p, mode, **kw))
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    assert "permission denied" in _one_line(err.value, path)


# ------------------------------------------------------------------------------------------------
# Config metadata
# ------------------------------------------------------------------------------------------------

def _with_config(path: Path, model, config_text: str) -> Path:
    save_model(path, model)
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    metadata["config"] = config_text
    save_file(tensors, str(path), metadata=metadata)
    return path


_BASE = SMALL.to_dict()
BAD_CONFIGS = {
    "null": "null", "number": "3", "list": "[1, 2]", "string": '"abc"', "not-json": "{dims: [8",
    "bare-word": "abc",
    "unknown-key": json.dumps({**_BASE, "colour": "blue"}),
    "negative-dims": json.dumps({**_BASE, "dims": [-8, 16]}),
    "zero-dims": json.dumps({**_BASE, "dims": [0, 16]}),
    "huge-dims": json.dumps({**_BASE, "dims": [8, 1 << 20]}),
    "huge-depths": json.dumps({**_BASE, "depths": [1, 1_000_000]}),
    "many-depths": json.dumps({**_BASE, "depths": [1, 1000]}),
    "huge-classes": json.dumps({**_BASE, "num_classes": 10 ** 9}),
    "float-dims": json.dumps({**_BASE, "dims": [8.0, 16]}),
    "string-depths": json.dumps({**_BASE, "depths": "1,1"}),
    "bool-classes": json.dumps({**_BASE, "num_classes": True}),
    "nan-ratio": json.dumps({**_BASE, "ssm_ratio": float("nan")}),
    "length-mismatch": json.dumps({**_BASE, "depths": [1, 1, 1]}),
    "bad-stem": json.dumps({**_BASE, "stem": "v9"}),
    "no-stages": json.dumps({**_BASE, "dims": [], "depths": []}),
    "bigger-than-file": json.dumps({**_BASE, "dims": [8, 32]}),
}


@pytest.mark.parametrize("kind", sorted(BAD_CONFIGS))
def test_malformed_config_metadata_is_one_line(tmp_path, small_model, kind):
    path = _with_config(tmp_path / f"{kind}.safetensors", small_model, BAD_CONFIGS[kind])
    with pytest.raises(CheckpointError) as err:
        load_model(None, path)
    assert "config" in _one_line(err.value, path)


def test_malformed_config_through_predict_and_convert(tmp_path, small_model):
    path = _with_config(tmp_path / "bad.safetensors", small_model, BAD_CONFIGS["unknown-key"])
    assert "colour" in _assert_cli_one_line(["predict", "--weights", path, "--device", "cpu", tmp_path / "x.png"], path)
    _assert_cli_one_line(["convert", path, tmp_path / "out.safetensors", "--model", "vmamba-tiny"], path)


def test_parameter_limit_is_checked_from_the_config(tmp_path):
    config = {**_BASE, "dims": [4096, 8192], "depths": [64, 64]}
    with pytest.raises(CheckpointError) as err:
        loading.validate_config(tmp_path / "f.safetensors", config)
    assert "parameters" in _one_line(err.value, tmp_path / "f.safetensors")
    assert loading.validate_config("f", _BASE, max_parameters=10 ** 6)["dims"] == (8, 16)
    with pytest.raises(CheckpointError):
        loading.validate_config("f", _BASE, max_parameters=100)


CONFIGS = [
    SMALL,
    VMambaConfig(dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), d_state=4, ssm_ratio=2.0, ssm_conv_bias=True,
                 gated=True, mlp_ratio=0.0, num_classes=5, channels_first=False, stem="v1", downsample="v1"),
    VMambaConfig(dims=(12, 24, 48), depths=(2, 0, 1), dt_rank=3, ssm_conv=1, num_classes=0, downsample="v2",
                 patch_size=2, in_chans=1, mlp_ratio=2.5),
    VMambaConfig(dims=(6, 10), depths=(1, 2), ssm_ratio=1.5, d_state=2, ssm_conv=5, patch_size=3, num_classes=7),
]


@pytest.mark.parametrize("config", CONFIGS, ids=range(len(CONFIGS)))
def test_parameter_count_from_the_config_matches_the_model(config):
    model = VSSM(config)
    assert loading.count_parameters(config.to_dict()) == sum(v.numel() for v in model.state_dict().values())
    assert VMambaConfig.from_dict(loading.validate_config("f", json.loads(json.dumps(config.to_dict())))) == config


def test_config_fields_and_defaults_follow_vmamba_config():
    fields = {f.name: f.default for f in dataclasses.fields(VMambaConfig)}
    assert loading.CONFIG_FIELDS == set(fields)
    assert loading._CONFIG_DEFAULTS == fields


# ------------------------------------------------------------------------------------------------
# Non-finite weights
# ------------------------------------------------------------------------------------------------

def test_nan_weights_are_refused_with_count_and_first_name(tmp_path, small_model):
    nan = {k: torch.full_like(v, float("nan")) for k, v in small_model.state_dict().items()}
    path = save_model(tmp_path / "nan.safetensors", small_model, state_dict=nan)
    with pytest.raises(CheckpointError) as err:
        load_model(None, path)
    first = next(iter(small_model.state_dict()))
    assert f"{len(nan)} tensors hold NaN/Inf, first: {first}" in _one_line(err.value, path)
    loaded = load_model(None, path, allow_non_finite=True)
    assert torch.isnan(loaded.model.classifier.head.weight).all()


def test_inf_head_is_refused_through_predict(tmp_path, small_model):
    state = dict(small_model.state_dict())
    state["classifier.head.weight"] = torch.full_like(state["classifier.head.weight"], float("inf"))
    path = save_model(tmp_path / "inf.safetensors", small_model, state_dict=state)
    image = tmp_path / "red.png"
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    line = _assert_cli_one_line(["predict", "--weights", path, "--device", "cpu", "--resolution", "32", image], path)
    assert "1 tensor holds NaN/Inf, first: classifier.head.weight" in line
    # The option the message names loads them anyway; the infinite logits then fail that image, not the run.
    result = CliRunner().invoke(app, ["predict", "--weights", str(path), "--device", "cpu", "--resolution", "32",
                                      "--allow-non-finite", "--json", str(image)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    document = json.loads(result.stdout)
    assert document["predictions"] == [] and [f["path"] for f in document["failures"]] == [str(image)]


def test_nan_in_official_pth_is_refused(tmp_path, small_model):
    state = dict(small_model.state_dict())
    key = "layers.0.blocks.0.norm.weight"
    state[key] = state[key].clone()
    state[key][0] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save({"model": state}, path)
    model = VSSM(SMALL)
    with pytest.raises(CheckpointError) as err:
        loading.load_weights_into(model, path)
    assert f"first: {key}" in _one_line(err.value, path)


# ------------------------------------------------------------------------------------------------
# Downloads (loopback server)
# ------------------------------------------------------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802 (http.server naming)
        server = self.server
        if self.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
            return
        if self.path == "/file":
            self.send_response(200)
            self.send_header("Content-Length", str(len(server.body)))
            self.end_headers()
            self.wfile.write(server.body)
            return
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.flush()
        # /trickle: a byte every 50 ms (each read succeeds, the rate stays at 20 B/s);
        # /silent: nothing after the headers. Both stop when the test ends.
        while not server.stop.is_set():
            if self.path == "/trickle":
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
            server.stop.wait(0.05)


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.stop = threading.Event()
    httpd.body = b"weights" * 1000
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.stop.set()
    httpd.shutdown()
    httpd.server_close()


FAST_STALL = download_module.StallRule(idle_s=0.5, min_bytes_per_s=1000.0, window_s=1.0)


@pytest.mark.parametrize("path,words", [("/trickle", "too slow"), ("/silent", "no data for 0.5 s")])
def test_stalled_download_ends_with_one_line_and_keeps_nothing(server, tmp_path, path, words):
    _, url = server
    dest = tmp_path / "cache" / "w.pth"
    start = time.monotonic()
    with pytest.raises(DownloadError) as err:
        download_module.download_file(url + path, dest, progress=False, timeout=10, stall=FAST_STALL)
    assert time.monotonic() - start < 30  # the rule ended it, not the 100000-byte body or a timeout
    text = _one_line(err.value, "w.pth")
    assert "stalled" in text and words in text
    assert list(dest.parent.iterdir()) == []


def test_redirect_loop_is_one_line(server, tmp_path):
    _, url = server
    with pytest.raises(DownloadError) as err:
        download_module.download_file(url + "/loop", tmp_path / "w.pth", progress=False, timeout=10)
    assert "redirects in a loop" in _one_line(err.value, "w.pth")
    assert list(tmp_path.iterdir()) == []


def test_part_files_of_a_killed_download_are_removed_on_the_next(server, tmp_path):
    httpd, url = server
    dest = tmp_path / "w.pth"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    killed = tmp_path / f".w.pth.{gone.pid}.abc123.part"
    killed.write_bytes(b"half a file")
    running = tmp_path / f".w.pth.{os.getppid()}.def456.part"  # a live process's download
    running.write_bytes(b"in progress")
    other = tmp_path / f".other.pth.{gone.pid}.ghi789.part"
    other.write_bytes(b"another file's")
    download_module.download_file(url + "/file", dest, progress=False)
    assert dest.read_bytes() == httpd.body
    assert not killed.exists()
    assert running.exists() and other.exists()
