"""The `vmamba` entry point: help, version, model listing."""

import json
import subprocess
import sys

from typer.testing import CliRunner

from vmamba_cli import __version__
from vmamba_cli.cli import app
from vmamba_cli.model import MODELS

runner = CliRunner()


def test_version_and_help():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"vmamba {__version__}"
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "models" in result.stdout


def test_models_json_lists_every_registered_model():
    result = runner.invoke(app, ["models", "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == list(MODELS)
    default = [r for r in rows if r["default"]]
    assert len(default) == 1 and default[0]["name"] == "vmamba-tiny-s1l8"
    tiny = default[0]
    assert tiny["params"] == 30_249_064 and abs(tiny["gflops"] - 4.905609984) < 1e-9 and tiny["top1"] == 82.6
    assert tiny["url"].endswith("/releases/download/%23v2cls/vssm1_tiny_0230s_ckpt_epoch_264.pth")
    assert tiny["preprocess"]["input_size"] == 224 and tiny["preprocess"]["crop_pct"] == 224 / 256
    assert tiny["preprocess"]["interpolation"] == "bicubic"


def test_models_table_is_human_output_on_stderr():
    proc = subprocess.run([sys.executable, "-m", "vmamba_cli", "models"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert proc.stdout == ""
    assert "vmamba-tiny-s1l8" in proc.stderr and "vssm1_tiny_0230s_ckpt_epoch_264.pth" in proc.stderr


def test_shipped_class_names_are_torchvision_list():
    from torchvision.models import ResNet50_Weights

    from vmamba_cli.data import imagenet_class_names

    assert imagenet_class_names() == list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def test_select_device():
    import pytest
    import torch

    from vmamba_cli.runtime import select_device

    assert select_device(torch.device("cpu")) == torch.device("cpu")
    assert select_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert select_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="no CUDA device"):
            select_device("cuda", local_rank=1)
