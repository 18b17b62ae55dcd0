"""Weights registry, download cache and convert, against a local HTTP server (no internet).

The served checkpoints are built here from a small VMamba with random weights and saved in the official
``.pth`` layout (``model``, ``model_ema``, ``optimizer``, ``epoch`` and a pickled yacs ``CfgNode``
``config``). The fake ``yacs`` package exists only while saving, so loading proves the restricted
unpickler copes without it.
"""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import json
import socket
import sys
import threading
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import vmamba_cli.model as model_module
from vmamba_cli.cli import app
from vmamba_cli.model import MODELS, ModelSpec, VMambaConfig, VSSM
from vmamba_cli.weights import (CheckpointError, DownloadError, NetworkError, cache_dir, fetch_weights, find_entry,
                                get_entry, list_entries, load_model, read_metadata, read_state_dict)
from vmamba_cli.weights.registry import HASHES_FILE

TEST_NAME = "vmamba-test"
TEST_FILE = "vssm_test_0101_ckpt_epoch_3.pth"
TEST_TOP1 = 12.5
TEST_CONFIG = VMambaConfig(dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_classes=10)
OTHER_CONFIG = VMambaConfig(dims=(8, 16, 24, 40), depths=(1, 1, 1, 1), num_classes=10)

YACS_SOURCE = '''
class CfgNode(dict):
    """Shape of yacs' CfgNode: a dict subclass with instance attributes."""
    def __init__(self, init_dict=None):
        super().__init__(init_dict or {})
        self.__dict__["__immutable__"] = False
'''
PAYLOAD_SOURCE = '''
import os
class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))
class Foreign:
    pass
'''


# ------------------------------------------------------------------------------------------------
# Checkpoints in the official layout
# ------------------------------------------------------------------------------------------------

class _TemporaryModules:
    """Make ``files`` ({relative path: source}) importable while inside, and forget them afterwards."""

    def __init__(self, root: Path, files: dict[str, str], names: tuple[str, ...]):
        self.root, self.files, self.names = root, files, names

    def __enter__(self):
        for rel, source in self.files.items():
            (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.root / rel).write_text(source)
        sys.path.insert(0, str(self.root))

    def __exit__(self, *exc):
        sys.path.remove(str(self.root))
        for name in self.names:
            sys.modules.pop(name, None)


def _official_checkpoint(path: Path, model: VSSM, ema_model: VSSM, fake_root: Path, extra=None) -> Path:
    with _TemporaryModules(fake_root, {"yacs/__init__.py": "", "yacs/config.py": YACS_SOURCE},
                           ("yacs", "yacs.config")):
        from yacs.config import CfgNode

        config = CfgNode({"MODEL": CfgNode({"TYPE": "vssm", "NUM_CLASSES": 10}), "TRAIN": CfgNode({"EPOCHS": 3})})
        # AdamW's state_dict layout, built by hand (creating a torch optimizer costs seconds on first use).
        params = list(model.parameters())
        optimizer = {"state": {i: {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(p),
                                   "exp_avg_sq": torch.zeros_like(p)} for i, p in enumerate(params)},
                     "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.05,
                                       "params": list(range(len(params)))}]}
        torch.save({"model": model.state_dict(), "model_ema": ema_model.state_dict(),
                    "optimizer": optimizer, "lr_scheduler": {"last_epoch": 3}, "max_accuracy": 12.5,
                    "scaler": {"scale": 65536.0}, "epoch": 3, "config": config, **(extra or {})}, path)
    assert importlib.util.find_spec("yacs") is None and "yacs" not in sys.modules
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Bytes of official-layout checkpoints: the test model, a second draw of it, another model, a payload."""
    root = tmp_path_factory.mktemp("official")
    torch.manual_seed(0)
    model, ema_model, other_draw = VSSM(TEST_CONFIG), VSSM(TEST_CONFIG), VSSM(TEST_CONFIG)
    other_model = VSSM(OTHER_CONFIG)
    files = {
        "good": _official_checkpoint(root / "good.pth", model, ema_model, root / "fake1"),
        "second": _official_checkpoint(root / "second.pth", other_draw, other_draw, root / "fake2"),
        "other": _official_checkpoint(root / "other.pth", other_model, other_model, root / "fake3"),
    }
    with _TemporaryModules(root / "fake4", {"evilmod.py": PAYLOAD_SOURCE}, ("evilmod",)):
        import evilmod

        files["payload"] = _official_checkpoint(root / "payload.pth", model, ema_model, root / "fake5",
                                                extra={"hook": evilmod.Payload()})
        files["foreign"] = _official_checkpoint(root / "foreign.pth", model, ema_model, root / "fake6",
                                                extra={"state": evilmod.Foreign()})
    data = {k: p.read_bytes() for k, p in files.items()}
    data["model_state"] = {k: v.clone() for k, v in model.state_dict().items()}
    data["ema_state"] = {k: v.clone() for k, v in ema_model.state_dict().items()}
    return data


# ------------------------------------------------------------------------------------------------
# A local release server
# ------------------------------------------------------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server naming)
        server = self.server
        server.requests.append(self.path)
        body = server.files.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in server.cut_short:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class ReleaseServer:
    def __init__(self):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.files, self.httpd.requests, self.httpd.cut_short = {}, [], set()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    @property
    def requests(self) -> list[str]:
        return self.httpd.requests

    def serve(self, path: str, body: bytes, cut_short: bool = False):
        self.httpd.files[path] = body
        (self.httpd.cut_short.add if cut_short else self.httpd.cut_short.discard)(path)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = ReleaseServer()
    yield srv
    srv.close()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("VMAMBA_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


RELEASE_PATH = f"/download/%23v2cls/{TEST_FILE}"


@pytest.fixture
def test_model(monkeypatch, server, home):
    """Register a small model with an official-looking release file served by the local server."""
    spec = ModelSpec(TEST_NAME, TEST_CONFIG, "VMamba-Test", "vmamba_test", TEST_FILE, "#v2cls", TEST_TOP1, None, 0, 0)
    monkeypatch.setitem(MODELS, TEST_NAME, spec)
    monkeypatch.setitem(model_module._ALIASES, TEST_NAME, TEST_NAME)
    monkeypatch.setattr(model_module, "RELEASE_URL", server.url + "/download/{tag}/{file}")
    return spec


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file() and p.name != HASHES_FILE) if folder.exists() else []


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------

def test_registry_has_the_nine_official_checkpoints():
    entries = list_entries()
    assert [e.name for e in entries] == list(MODELS) and len(entries) == 9
    assert len({e.file for e in entries}) == 9
    for entry in entries:
        spec = MODELS[entry.name]
        tag = "%23v0cls" if entry.name.startswith("vmamba-v0") else "%23v2cls"
        assert entry.url == f"https://github.com/MzeroMiko/VMamba/releases/download/{tag}/{entry.file}"
        assert entry.file == spec.checkpoint and entry.file.endswith(".pth")
        assert entry.top1 == spec.top1 and 82 < entry.top1 < 84
        assert entry.entry == "model" and entry.config == spec.config
    assert find_entry("vmamba-tiny").file == "vssm1_tiny_0230s_ckpt_epoch_264.pth"
    assert find_entry("vssm_tiny_0230_ckpt_epoch_262.pth").name == "vmamba-tiny-s2l5"
    assert find_entry(entries[0].url) == entries[0]
    assert find_entry("no-such-model") is None and find_entry("my_model.pth") is None
    with pytest.raises(KeyError, match="vmamba-base-s1l20"):
        get_entry("no-such-model")


def test_cache_dir_follows_vmamba_home(monkeypatch, tmp_path):
    monkeypatch.setenv("VMAMBA_HOME", str(tmp_path / "vh"))
    assert cache_dir() == tmp_path / "vh" / "checkpoints"
    monkeypatch.delenv("VMAMBA_HOME")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert cache_dir() == tmp_path / "user" / ".cache" / "vmamba" / "checkpoints"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "vmamba" / "checkpoints"


def test_one_cache_root_for_checkpoints_and_kernels(monkeypatch, tmp_path):
    from vmamba_cli.kernels.cache import cache_root

    monkeypatch.setenv("VMAMBA_HOME", str(tmp_path / "vh"))
    assert cache_root() == tmp_path / "vh" and cache_dir().parent == cache_root()


# ------------------------------------------------------------------------------------------------
# Download and cache
# ------------------------------------------------------------------------------------------------

def test_download_verifies_records_sha256_and_loads(test_model, server, checkpoints, home):
    server.serve(RELEASE_PATH, checkpoints["good"])
    path = fetch_weights(TEST_NAME, progress=False)
    assert path == home / "checkpoints" / TEST_FILE
    assert path.read_bytes() == checkpoints["good"]
    record = json.loads((home / "checkpoints" / HASHES_FILE).read_text())[TEST_FILE]
    assert record["sha256"] == hashlib.sha256(checkpoints["good"]).hexdigest()
    assert record["url"] == server.url + RELEASE_PATH and record["size"] == len(checkpoints["good"])
    assert _leftovers(home / "checkpoints") == [TEST_FILE]
    assert server.requests == [RELEASE_PATH]

    # load_model resolves the registry name through the cache, and takes the `model` entry.
    loaded = load_model(weights=TEST_NAME)
    assert loaded.name == TEST_NAME and loaded.source == str(path)
    assert _same_state(loaded.model.state_dict(), checkpoints["model_state"])
    # An official file name alone tells which model it is; --ema picks model_ema.
    loaded_ema = load_model(weights=path, ema=True)
    assert loaded_ema.name == TEST_NAME
    assert _same_state(loaded_ema.model.state_dict(), checkpoints["ema_state"])
    assert server.requests == [RELEASE_PATH]  # cache hits: no second request


def test_cache_hit_makes_no_request(test_model, server, checkpoints, home):
    server.serve(RELEASE_PATH, checkpoints["good"])
    first = fetch_weights(TEST_NAME, progress=False)
    second = fetch_weights(TEST_FILE, progress=False)
    third = fetch_weights(server.url + RELEASE_PATH, progress=False)  # the official URL maps to the entry
    assert first == second == third
    assert server.requests == [RELEASE_PATH]
    fetch_weights(TEST_NAME, force=True, progress=False)
    assert server.requests == [RELEASE_PATH, RELEASE_PATH]


def test_file_placed_in_cache_by_hand_is_used(test_model, server, checkpoints, home):
    (home / "checkpoints").mkdir(parents=True)
    (home / "checkpoints" / TEST_FILE).write_bytes(checkpoints["good"])
    assert fetch_weights(TEST_NAME, progress=False) == home / "checkpoints" / TEST_FILE
    assert server.requests == []
    recorded = json.loads((home / "checkpoints" / HASHES_FILE).read_text())[TEST_FILE]["sha256"]
    assert recorded == hashlib.sha256(checkpoints["good"]).hexdigest()


@pytest.mark.parametrize("body, message", [
    (b"\x00garbage" * 4096, "not usable"),
    (b"PK\x03\x04 truncated zip" * 100, "not usable"),
], ids=["garbage", "broken-zip"])
def test_corrupt_download_leaves_nothing(test_model, server, home, body, message):
    server.serve(RELEASE_PATH, body)
    with pytest.raises(DownloadError, match=message) as info:
        fetch_weights(TEST_NAME, progress=False)
    assert TEST_FILE in str(info.value) and "\n" not in str(info.value)
    assert _leftovers(home / "checkpoints") == []


def test_download_of_another_models_weights_is_refused(test_model, server, checkpoints, home):
    server.serve(RELEASE_PATH, checkpoints["other"])
    with pytest.raises(DownloadError, match="does not fit vmamba-test.*shape conflicts"):
        fetch_weights(TEST_NAME, progress=False)
    assert _leftovers(home / "checkpoints") == []


@pytest.mark.parametrize("kind, refused", [("payload", "posix.system"), ("foreign", "evilmod.Foreign")])
def test_pickled_code_in_download_is_refused(test_model, server, checkpoints, home, kind, refused):
    server.serve(RELEASE_PATH, checkpoints[kind])
    with pytest.raises(DownloadError, match=f"refusing to unpickle {refused}"):
        fetch_weights(TEST_NAME, progress=False)
    assert _leftovers(home / "checkpoints") == []


def test_interrupted_download_leaves_nothing_and_retry_works(test_model, server, checkpoints, home):
    server.serve(RELEASE_PATH, checkpoints["good"], cut_short=True)
    with pytest.raises(DownloadError, match="interrupted") as info:
        fetch_weights(TEST_NAME, progress=False)
    assert f"of {len(checkpoints['good'])} bytes" in str(info.value)
    assert _leftovers(home / "checkpoints") == []
    assert not (home / "checkpoints" / HASHES_FILE).exists()
    server.serve(RELEASE_PATH, checkpoints["good"])
    assert fetch_weights(TEST_NAME, progress=False).read_bytes() == checkpoints["good"]


def test_changed_cached_file_fails_its_sha256(test_model, server, checkpoints, home):
    server.serve(RELEASE_PATH, checkpoints["good"])
    path = fetch_weights(TEST_NAME, progress=False)
    path.write_bytes(checkpoints["second"])  # loadable and fitting, but not what was downloaded
    with pytest.raises(CheckpointError, match="changed since it was downloaded.*--force"):
        fetch_weights(TEST_NAME, progress=False)
    with pytest.raises(CheckpointError, match="changed since it was downloaded"):
        load_model(weights=TEST_NAME)
    assert fetch_weights(TEST_NAME, force=True, progress=False).read_bytes() == checkpoints["good"]


def test_redownload_that_differs_from_the_recorded_sha256_is_refused(test_model, server, checkpoints, home):
    server.serve(RELEASE_PATH, checkpoints["good"])
    path = fetch_weights(TEST_NAME, progress=False)
    path.unlink()
    server.serve(RELEASE_PATH, checkpoints["second"])
    with pytest.raises(DownloadError, match="SHA-256"):
        fetch_weights(TEST_NAME, progress=False)
    assert _leftovers(home / "checkpoints") == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_network_error_names_the_file_and_the_next_step(test_model, monkeypatch, home):
    monkeypatch.setattr(model_module, "RELEASE_URL", f"http://127.0.0.1:{_closed_port()}/download/{{tag}}/{{file}}")
    entry = get_entry(TEST_NAME)
    with pytest.raises(NetworkError) as info:
        fetch_weights(TEST_NAME, progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert entry.url in message and "--weights PATH" in message
    assert str(home / "checkpoints" / TEST_FILE) in message
    assert _leftovers(home / "checkpoints") == []


def test_http_error_is_one_line(test_model, server, home):
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch_weights(TEST_NAME, progress=False)
    assert _leftovers(home / "checkpoints") == []


def test_any_url_downloads_into_the_cache(test_model, server, checkpoints, home):
    server.serve("/mirror/finetuned.pth", checkpoints["good"])
    url = server.url + "/mirror/finetuned.pth"
    loaded = load_model(TEST_NAME, url)
    assert Path(loaded.source).name == "finetuned.pth" and Path(loaded.source).is_relative_to(home)
    assert _same_state(loaded.model.state_dict(), checkpoints["model_state"])
    load_model(TEST_NAME, url)
    assert server.requests == ["/mirror/finetuned.pth"]


def test_official_weights_of_another_model_are_named(test_model, server, checkpoints):
    with pytest.raises(CheckpointError, match="official weights of vmamba-test, not of vmamba-tiny-s1l8"):
        load_model("vmamba-tiny", TEST_NAME)
    assert server.requests == []


# ------------------------------------------------------------------------------------------------
# CLI: weights list / download, convert, predict without network
# ------------------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_weights_list_and_download(test_model, server, checkpoints, home):
    server.serve(RELEASE_PATH, checkpoints["good"])
    result = runner.invoke(app, ["weights", "list", "--json"])
    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    assert listing["cache_dir"] == str(home / "checkpoints")
    rows = {row["name"]: row for row in listing["weights"]}
    assert len(rows) == 10 and rows[TEST_NAME]["cached"] is False and rows[TEST_NAME]["size_bytes"] is None

    result = runner.invoke(app, ["weights", "download", TEST_NAME, "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["path"] == str(home / "checkpoints" / TEST_FILE)
    assert info["sha256"] == hashlib.sha256(checkpoints["good"]).hexdigest()

    rows = {row["name"]: row for row in json.loads(runner.invoke(app, ["weights", "list", "--json"]).stdout)["weights"]}
    assert rows[TEST_NAME]["cached"] is True and rows[TEST_NAME]["size_bytes"] == len(checkpoints["good"])
    assert rows["vmamba-tiny-s1l8"]["cached"] is False

    human = runner.invoke(app, ["weights", "list"])
    assert human.exit_code == 0 and human.stdout == ""
    assert TEST_FILE in human.stderr and "yes" in human.stderr

    bad = runner.invoke(app, ["weights", "download", "no-such-model"])
    assert bad.exit_code == 1 and bad.stderr.count("\n") == 1 and "no official weights named" in bad.stderr


def test_cli_predict_without_network_says_what_to_do(monkeypatch, home, tmp_path):
    monkeypatch.setattr(model_module, "RELEASE_URL", f"http://127.0.0.1:{_closed_port()}/download/{{tag}}/{{file}}")
    image = tmp_path / "cat.jpg"
    image.write_bytes(b"not needed: the weights fail first")
    result = runner.invoke(app, ["predict", str(image)])
    assert result.exit_code == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: vssm1_tiny_0230s_ckpt_epoch_264.pth: cannot download")
    assert "--weights PATH" in lines[0]
    assert str(home / "checkpoints" / "vssm1_tiny_0230s_ckpt_epoch_264.pth") in lines[0]
    assert "Traceback" not in result.output


def test_convert_official_to_safetensors(test_model, checkpoints, tmp_path):
    source = tmp_path / TEST_FILE
    source.write_bytes(checkpoints["good"])
    destination = tmp_path / "out" / "test.safetensors"
    result = runner.invoke(app, ["convert", str(source), str(destination), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["model"] == TEST_NAME and summary["entry"] == "model"
    assert summary["source_sha256"] == hashlib.sha256(checkpoints["good"]).hexdigest()

    metadata = read_metadata(destination)
    assert metadata["model"] == TEST_NAME and metadata["source_file"] == TEST_FILE
    assert metadata["top1"] == TEST_TOP1 and VMambaConfig.from_dict(metadata["config"]) == TEST_CONFIG
    tensors, _ = read_state_dict(destination)
    assert _same_state(tensors, checkpoints["model_state"])
    loaded = load_model(weights=destination)  # architecture from the metadata alone
    assert loaded.name == TEST_NAME and _same_state(loaded.model.state_dict(), checkpoints["model_state"])

    ema_destination = tmp_path / "test-ema.safetensors"
    assert runner.invoke(app, ["convert", str(source), str(ema_destination), "--ema"]).exit_code == 0
    assert _same_state(read_state_dict(ema_destination)[0], checkpoints["ema_state"])
    assert read_metadata(ema_destination)["source_entry"] == "model_ema"


def test_convert_needs_model_for_unknown_file_names(test_model, checkpoints, tmp_path, monkeypatch):
    source = tmp_path / "my_run_epoch_3.pth"
    source.write_bytes(checkpoints["good"])
    destination = tmp_path / "mine.safetensors"
    result = runner.invoke(app, ["convert", str(source), str(destination)])
    assert result.exit_code == 1 and "pass --model NAME" in result.stderr and result.stderr.count("\n") == 1
    assert not destination.exists()

    result = runner.invoke(app, ["convert", str(source), str(destination), "--model", TEST_NAME])
    assert result.exit_code == 0, result.output
    metadata = read_metadata(destination)
    assert metadata["model"] == TEST_NAME and "top1" not in metadata  # not the official file: no claim

    other = ModelSpec("vmamba-test-other", OTHER_CONFIG, "-", "-", "other.pth", "#v2cls", 1.0, None, 0, 0)
    monkeypatch.setitem(MODELS, other.name, other)
    monkeypatch.setitem(model_module._ALIASES, other.name, other.name)
    result = runner.invoke(app, ["convert", str(source), str(tmp_path / "x.safetensors"), "--model", other.name])
    assert result.exit_code == 1 and "does not fit" in result.stderr and not (tmp_path / "x.safetensors").exists()


def test_unwritable_cache_is_one_line(test_model, server, checkpoints, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("VMAMBA_HOME points below a file, so the cache folder cannot be made")
    monkeypatch.setenv("VMAMBA_HOME", str(blocker / "home"))
    server.serve(RELEASE_PATH, checkpoints["good"])
    with pytest.raises(DownloadError, match="cannot write to the cache folder .* set VMAMBA_HOME"):
        fetch_weights(TEST_NAME, progress=False)
    assert server.requests == []
