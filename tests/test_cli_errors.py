"""Every command that loads weights turns a bad weights file into one line and a non-zero exit."""

import subprocess
import sys

import pytest
import torch

from vmamba_cli.model import VMambaConfig, VSSM

TINY = VMambaConfig(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), num_classes=3)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    good = root / "good.pth"
    torch.save({"model": VSSM(TINY).state_dict()}, good)
    truncated = root / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = root / "notes.pth"
    text.write_text("not weights\n")
    other = root / "other.pth"
    torch.save({"model": VSSM(TINY.replace(dims=(16, 32, 64, 128))).state_dict()}, other)
    images = root / "images" / "a"
    images.mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 30, 30)).save(images / "red.png")
    return {"truncated": truncated, "text": text, "other": other, "images": root / "images", "root": root}


def _commands(files, weights):
    img_dir = files["images"]
    out = files["root"] / "out"
    return {
        "predict": ["predict", str(img_dir / "a" / "red.png"), "--weights", str(weights), "--resolution", "32"],
        "eval": ["eval", str(img_dir), "--weights", str(weights), "--resolution", "32"],
        "erf": ["erf", "--weights", str(weights), "--noise", "--num-images", "1", "--resolution", "64",
                "--out", str(out / "erf.png")],
        "convert": ["convert", str(weights), str(out / "c.safetensors"), "--model", "vmamba-tiny"],
        "train": ["train", "--data", str(img_dir), "--pretrained", str(weights), "--epochs", "1",
                  "--output", str(out / "run")],
    }


CASES = [(command, "truncated") for command in ("predict", "eval", "erf", "convert", "train")] + [
    ("predict", "text"), ("predict", "other"), ("eval", "other"), ("convert", "text"), ("train", "other")]


@pytest.mark.parametrize("command,kind", CASES)
def test_bad_weights_give_one_line_error(bad_files, kind, command):
    weights = bad_files[kind]
    args = _commands(bad_files, weights)[command]
    proc = subprocess.run([sys.executable, "-m", "vmamba_cli", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert str(weights) in errors[0]


def test_user_errors_are_handled_once_by_the_cli(monkeypatch):
    """Any VMambaError leaving a command becomes one stderr line and the class's exit status."""
    from typer.testing import CliRunner

    import vmamba_cli.commands.predict as predict_command
    from vmamba_cli.cli import app
    from vmamba_cli.errors import DataError, UnknownModelError, VMambaError

    class Special(VMambaError):
        exit_code = 7

    runner = CliRunner()
    for error, code, line in [(Special("thing.png: broken in a special way"), 7, "thing.png: broken in a special way"),
                              (DataError("data: no class folders"), 1, "data: no class folders"),
                              (UnknownModelError("unknown model 'x'"), 1, "unknown model 'x'")]:
        def fake_predict(*args, _error=error, **kwargs):
            raise _error

        monkeypatch.setattr(predict_command, "predict", fake_predict)
        result = runner.invoke(app, ["predict", "thing.png", "--device", "cpu"])
        assert result.exit_code == code, result.output
        assert result.stdout == "" and result.stderr.strip().splitlines() == [f"error: {line}"]
    # Anything else is a bug and keeps its traceback.
    monkeypatch.setattr(predict_command, "predict", lambda *a, **k: 1 / 0)
    result = runner.invoke(app, ["predict", "thing.png", "--device", "cpu"])
    assert isinstance(result.exception, ZeroDivisionError)


def test_unknown_model_is_a_key_error_with_a_plain_message():
    from vmamba_cli.errors import UnknownModelError, VMambaError
    from vmamba_cli.model import resolve_model_name

    with pytest.raises(UnknownModelError) as err:
        resolve_model_name("vmamba-tinny")
    assert isinstance(err.value, KeyError) and isinstance(err.value, VMambaError)
    assert str(err.value).startswith("unknown model 'vmamba-tinny'") and "did you mean" in str(err.value)
