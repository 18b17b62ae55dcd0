"""`vmamba profile`: FLOPs in the official convention, FlopCounterMode registration, OOM handling, CLI."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from vmamba_cli.cli import app
from vmamba_cli.flops import count_flops, flops_breakdown, fvcore_einsum_flops, stage_sizes
from vmamba_cli.model import MODELS, VSSM, get_model_spec
from vmamba_cli.profile import (PeakMemory, crossover, fit_exponent, is_out_of_memory, peer_flops, profile,
                                scaling_report)

runner = CliRunner()


@pytest.fixture(autouse=True)
def one_thread():
    """Run with one thread and restore the setting: on this shared 2-core machine two OpenMP
    threads per process are oversubscribed and ran up to 25x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield 1
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MODELS))
def test_closed_form_equals_published_flops(name):
    spec = MODELS[name]
    assert count_flops(spec.config, 224) == spec.flops


def test_v0_einsum_rounding_is_what_makes_the_published_number():
    cfg = get_model_spec("vmamba-v0-tiny").config
    # Unrounded value quoted in docs/design.md §6; the rounded one is the published 5.626895040 G.
    assert count_flops(cfg, 224, legacy_einsum=False) == 5_626_902_528
    assert fvcore_einsum_flops(123_456_789) == 123_450_000
    # Batch scales everything linearly except the per-einsum rounding.
    v2 = get_model_spec("vmamba-small-s2l15").config
    assert count_flops(v2, 224, batch=3) == 3 * count_flops(v2, 224)


@pytest.mark.parametrize("name", ["vmamba-tiny-s1l8", "vmamba-v0-tiny"])
def test_stage_sizes_match_the_model_at_odd_sizes(name):
    cfg = get_model_spec(name).config.replace(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), num_classes=5)
    model = VSSM(cfg).eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, 73, 58))
    assert [tuple(f.shape[-2:]) for f in features] == stage_sizes(cfg, (73, 58))


def _small(name):
    # dims >= 17 keep dt_rank >= 2: a rank-1 einsum runs as a broadcast multiply, which
    # FlopCounterMode does not count.
    return get_model_spec(name).config.replace(dims=(32, 64, 128, 256), depths=(1, 1, 2, 1), num_classes=10)


@pytest.mark.parametrize("name", ["vmamba-tiny-s1l8", "vmamba-v0-tiny"])
def test_flop_counter_mode_sees_the_scan_and_agrees_with_closed_form(name):
    """FlopCounterMode counts 2 per multiply-add, skips LayerNorm and pooling, and does not round
    einsums; with those conventions its total equals the closed form exactly."""
    cfg = _small(name)
    model = VSSM(cfg).eval()
    x = torch.randn(2, 3, 64, 48)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    parts = flops_breakdown(cfg, (64, 48), batch=2, legacy_einsum=False)
    # The SS2D core is one operator; its formula counts the x/dt projections and the scan.
    assert counts["vmamba.cross_selective_scan"] == 2 * (parts["x_proj"] + parts["dt_proj"] + parts["scan"])
    comparable = sum(parts.values()) - parts["norm"] - parts["pool"]
    assert counter.get_total_flops() == 2 * comparable


def test_flop_counter_mode_counts_scan_backward_and_keeps_gradients():
    cfg = _small("vmamba-tiny-s1l8")
    torch.manual_seed(0)
    model = VSSM(cfg)  # train mode; drop_path off below so both runs see the same function
    for m in model.modules():
        if hasattr(m, "p"):
            m.p = 0.0
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    model(x).square().sum().backward()
    reference = x.grad.clone()
    x.grad = None
    with FlopCounterMode(display=False) as counter:
        model(x).square().sum().backward()
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    assert counts["vmamba.cross_selective_scan_backward"] == 2 * counts["vmamba.cross_selective_scan"] > 0
    torch.testing.assert_close(x.grad, reference, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Library: OOM handling, ratios, memory
# ------------------------------------------------------------------------------------------------

class FakeRunner:
    """Simulates OOM: above ``max_batch`` at 64, always at 96; records every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, task):
        self.calls.append((task.model_name, task.resolution, task.mode, task.batch_size))
        if task.resolution == 96 and task.model_name.startswith("vmamba"):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if task.resolution == 64 and task.batch_size > 2:
            raise torch.OutOfMemoryError("simulated")
        if task.resolution == 96 and task.model_name == "resnet18":
            raise ValueError("something else broke")
        scale = 1.0 if task.model_name.startswith("vmamba") else 2.0
        if task.mode == "inference":
            return {"latency_ms": 10.0 * task.batch_size, "images_per_s": 100.0 * scale,
                    "peak_memory_mb": 50.0 * scale, "memory_method": "fake"}
        if task.mode == "train":
            return {"train_step_ms": 30.0, "train_images_per_s": 30.0 * scale, "train_peak_memory_mb": 80.0}
        return {"scan_op": "fake", "scan_ms": 1.0, "scan_bytes": 4e6, "scan_gbs": 4.0}


def test_oom_halves_batch_then_reports_oom_and_goes_on():
    fake = FakeRunner()
    rows = profile(["vmamba-tiny"], [64, 96], compare=["resnet18"], batch_size=8, train=True,
                   device="cpu", bandwidth_gbs=40.0, runner=fake)
    by = {(r["model"], r["resolution"]): r for r in rows}
    ok = by[("vmamba-tiny-s1l8", 64)]
    assert ok["status"] == "ok" and ok["batch_size"] == 2 and ok["requested_batch_size"] == 8
    inference_batches = [c[3] for c in fake.calls if c[:3] == ("vmamba-tiny-s1l8", 64, "inference")]
    assert inference_batches == [8, 4, 2]
    assert ok["train_batch_size"] == 2 and ok["scan_bandwidth_fraction"] == pytest.approx(0.1)

    oom = by[("vmamba-tiny-s1l8", 96)]
    assert oom["status"] == "OOM" and oom["batch_size"] == 1 and "images_per_s" not in oom
    assert [c[3] for c in fake.calls if c[:3] == ("vmamba-tiny-s1l8", 96, "inference")] == [8, 4, 2, 1]
    # The run went on: the peer was measured after the OOM row; other errors are rows too, not retried.
    assert by[("resnet18", 64)]["status"] == "ok"
    broken = by[("resnet18", 96)]
    assert broken["status"] == "error" and "something else broke" in broken["error"]
    assert len([c for c in fake.calls if c[:3] == ("resnet18", 96, "inference")]) == 1
    # Ratios against the first VMamba model at the same resolution.
    peer = by[("resnet18", 64)]
    assert peer["vs"]["reference"] == "vmamba-tiny-s1l8"
    assert peer["vs"]["images_per_s"] == pytest.approx(2.0)
    assert peer["vs"]["train_images_per_s"] == pytest.approx(2.0)
    assert peer["vs"]["flops"] == pytest.approx(peer["flops"] / by[("vmamba-tiny-s1l8", 64)]["flops"])
    assert broken["vs"]["reference"] == "vmamba-tiny-s1l8" and broken["vs"]["images_per_s"] is None


@pytest.mark.parametrize("name", ["resnet50", "swin_t", "vit_b_16"])
def test_peer_flops_reproduce_torchvision_published_ops(name):
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    macs, params = peer_flops(name, 224)
    assert macs / 1e9 == pytest.approx(weights.meta["_ops"], abs=5e-4)
    assert params == weights.meta["num_params"]


def test_out_of_memory_recognition():
    assert is_out_of_memory(torch.OutOfMemoryError("x"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_peak_memory_sees_a_transient_allocation_in_process():
    for megabytes in (64, 192):  # the second reading must not be hidden by the first's peak
        with PeakMemory(torch.device("cpu")) as pm:
            block = torch.ones(megabytes * (1 << 18))
            del block
        assert megabytes * 0.9 <= pm.peak_mb <= megabytes + 64


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="unknown torchvision model 'swin_tt'"):
        profile(["vmamba-tiny"], [64], compare=["swin_tt"], runner=FakeRunner(), scan_bandwidth=False)
    with pytest.raises(KeyError):
        profile(["vmamba-nope"], [64], runner=FakeRunner())


# ------------------------------------------------------------------------------------------------
# Real measurements
# ------------------------------------------------------------------------------------------------

def test_vmamba_tiny_runs_at_1024_on_cpu(one_thread):
    # One forward at batch 1 (--warmup 0 --iters 1).
    rows = profile(["vmamba-tiny"], [1024], device="cpu", warmup=0, iters=1, scan_bandwidth=False,
                   threads=one_thread)
    (row,) = rows
    assert row["status"] == "ok", row.get("error")
    assert row["flops"] == count_flops(get_model_spec("vmamba-tiny").config, 1024)
    assert row["latency_ms"] > 0 and row["images_per_s"] > 0
    # The 1024x1024 activations (stage 0: 96 x 256 x 256 floats = 24 MiB each) must show up.
    assert row["peak_memory_mb"] > 24


def test_cli_json_csv_plot(tmp_path, one_thread):
    out_csv, out_png = tmp_path / "p.csv", tmp_path / "scaling.png"
    result = runner.invoke(app, [
        "profile", "--model", "vmamba-tiny", "--resolution", "64", "--compare", "resnet18", "mobilenet_v3_small",
        "--warmup", "0", "--iters", "1", "--train", "--bandwidth-gbs", "50", "--json", "--threads", "1",
        "--csv", str(out_csv), "--plot", str(out_png),
    ])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["environment"]["scan_backend"] and doc["environment"]["device"] == "cpu"
    rows = doc["rows"]
    assert [r["model"] for r in rows] == ["vmamba-tiny-s1l8", "resnet18", "mobilenet_v3_small"]
    for r in rows:
        assert r["status"] == "ok" and r["train_status"] == "ok"
        for key in ("params", "flops", "latency_ms", "images_per_s", "peak_memory_mb", "train_images_per_s"):
            assert r[key] > 0, key
        assert set(r["vs"]) >= {"reference", "images_per_s", "peak_memory_mb", "flops", "train_images_per_s"}
        assert r["vs"]["reference"] == "vmamba-tiny-s1l8"
    vm = rows[0]
    assert vm["vs"]["images_per_s"] == 1.0
    assert vm["scan_gbs"] > 0 and vm["scan_bytes"] > 0 and vm["bandwidth_gbs"] == 50.0
    with open(out_csv) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 and float(table[1]["vs_images_per_s"]) > 0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_accepts_space_separated_values_and_repeated_flags(monkeypatch):
    seen = {}

    def fake_profile(models, resolutions, **kwargs):
        seen.update(models=list(models), resolutions=list(resolutions), compare=list(kwargs["compare"]),
                    batch_size=kwargs["batch_size"])
        return [{"model": "m", "family": "vmamba", "resolution": r, "status": "ok", "batch_size": 1,
                 "params": 1, "gflops": 1.0} for r in resolutions]

    monkeypatch.setattr("vmamba_cli.profile.profile", fake_profile)
    result = runner.invoke(app, ["profile", "--resolution", "224", "512", "-r", "768", "--model", "vmamba-tiny",
                                 "--compare", "swin_t", "resnet50", "-b", "4", "--json", "--no-scan-bandwidth"])
    assert result.exit_code == 0, result.output
    assert seen == {"models": ["vmamba-tiny"], "resolutions": [224, 512, 768],
                    "compare": ["swin_t", "resnet50"], "batch_size": 4}
    result = runner.invoke(app, ["profile", "--amp", "float64"])
    assert result.exit_code == 1 and "--amp" in result.output


# ------------------------------------------------------------------------------------------------
# Cost against pixel count: exponents, crossovers, ViT peers
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("exponent", [1.0, 2.0, 1.37])
def test_fit_exponent_recovers_the_power_law(exponent):
    pixels = [r * r for r in (32, 64, 96, 224, 512)]
    wobble = [1.02, 0.97, 1.01, 0.99, 1.03]  # multiplicative noise, as timings have
    fit = fit_exponent(pixels, [3e-6 * p ** exponent * w for p, w in zip(pixels, wobble)])
    assert fit["exponent"] == pytest.approx(exponent, abs=0.02)
    assert fit["points"] == 5 and 0.99 < fit["r2"] <= 1.0
    exact = fit_exponent(pixels, [p ** exponent for p in pixels])
    assert exact["exponent"] == pytest.approx(exponent, rel=1e-12) and exact["r2"] == pytest.approx(1.0)


def test_fit_exponent_needs_two_usable_points():
    assert fit_exponent([1024], [5.0]) is None
    assert fit_exponent([1024, 1024], [5.0, 6.0]) is None
    # zero or missing costs (memory not measurable) are left out, not logged
    assert fit_exponent([100, 400, 900], [0.0, None, 9.0]) is None
    assert fit_exponent([100, 400, 900], [0.0, 4.0, 9.0])["exponent"] == pytest.approx(1.0)


def test_crossover_statuses_and_estimate():
    # reference ~ P (linear), peer ~ P^2 / 200^2: equal at 200 px, so overtaken between 128 and 256
    points = [(r, 1.0 / (r * r), 1.0 / (r ** 4 / 200 ** 2)) for r in (64, 128, 256, 512)]
    result = crossover(points, higher_is_better=True)  # images/s
    assert result["status"] == "overtakes" and result["resolution"] == 256
    assert result["estimated_resolution"] == pytest.approx(200.0, rel=1e-9)
    assert [round(a["advantage"], 6) for a in result["advantage"]] == [
        round((r / 200) ** 2, 6) for r in (64, 128, 256, 512)]
    # memory: lower is better; ahead everywhere, then behind at the largest
    assert crossover([(64, 1.0, 2.0), (128, 2.0, 4.0)], higher_is_better=False)["status"] == "ahead_throughout"
    mixed = crossover([(64, 3.0, 2.0), (128, 2.0, 4.0), (256, 9.0, 8.0)], higher_is_better=False)
    assert mixed["status"] == "behind_at_largest" and mixed["resolution"] is None
    assert crossover([(64, 1.0, 1.0)], higher_is_better=True)["status"] == "behind_at_largest"  # a tie is not ahead
    assert crossover([], higher_is_better=True)["status"] == "no_data"


def test_crossover_counts_out_of_memory_as_the_worse_side():
    # the peer runs out of memory at 1024: the reference is ahead there, with no estimate to interpolate
    result = crossover([(512, 90.0, 80.0), (1024, 300.0, None)], higher_is_better=False)
    assert result["status"] == "overtakes" and result["resolution"] == 1024
    assert result["estimated_resolution"] is None and result["advantage"][1]["advantage"] == float("inf")
    # the reference itself out of memory at the largest size: not within range
    assert crossover([(512, 2.0, 1.0), (1024, None, 0.5)], True)["status"] == "behind_at_largest"
    assert crossover([(512, None, None)], True)["status"] == "no_data"


def _row(model, family, res, ips, mem, status="ok", batch=1):
    row = {"model": model, "family": family, "resolution": res, "status": status, "batch_size": batch}
    if status == "ok":
        row.update(images_per_s=ips, peak_memory_mb=mem)
    return row


def test_scaling_report_on_rows():
    rs = (128, 256, 512, 1024)
    rows = [_row("vm", "vmamba", r, 1e6 / r ** 2, 1e-3 * r ** 2) for r in rs]
    for row in rows:
        row["flops"] = 7 * row["resolution"] ** 2
    rows += [_row("vit", "torchvision", r, 4e11 / r ** 4, 2e-8 * r ** 4) for r in rs[:3]]
    rows += [_row("vit", "torchvision", 1024, None, None, status="OOM")]
    rows += [_row("cnn", "torchvision", r, 2e6 / r ** 2, 5e-4 * r ** 2) for r in rs]
    report = scaling_report(rows)
    assert report["reference"] == "vm"
    exps = {m["model"]: m for m in report["models"]}
    assert exps["vm"]["time_exponent"] == pytest.approx(1.0) and exps["vm"]["memory_exponent"] == pytest.approx(1.0)
    assert exps["vit"]["time_exponent"] == pytest.approx(2.0) and exps["vit"]["memory_exponent"] == pytest.approx(2.0)
    assert exps["vit"]["resolutions"] == [128, 256, 512] and exps["vit"]["time_fit"]["points"] == 3
    assert exps["vm"]["flops_exponent"] == pytest.approx(1.0) and exps["vit"]["flops_exponent"] is None
    cross = {c["model"]: c for c in report["crossovers"]}
    # vit: images/s ratio vm/vit = r^2 / 4e5, equal at r = 632.5: overtaken at 1024 (the OOM row)
    assert cross["vit"]["images_per_s"]["status"] == "overtakes"
    assert cross["vit"]["images_per_s"]["resolution"] == 1024
    # memory vit/vm = 2e-5 r^2, equal at r = 223.6 -> overtaken at 256, estimate interpolated
    assert cross["vit"]["peak_memory_mb"]["resolution"] == 256
    assert cross["vit"]["peak_memory_mb"]["estimated_resolution"] == pytest.approx(223.607, rel=1e-4)
    assert cross["cnn"]["images_per_s"]["status"] == "behind_at_largest"
    assert cross["cnn"]["peak_memory_mb"]["status"] == "behind_at_largest"
    # memory measured at another batch size (an OOM retry) is not compared
    rows[0]["batch_size"] = 2
    points = scaling_report(rows)["crossovers"][0]["peak_memory_mb"]["advantage"]
    assert [p["resolution"] for p in points] == [256, 512, 1024]


def test_vit_peers_are_built_per_resolution_and_tags_are_refused():
    fake = FakeRunner()
    rows = profile([], [64, 80], compare=["vit_b_32"], runner=fake, scan_bandwidth=False, device="cpu")
    ok, bad = rows
    assert ok["status"] == "ok" and ok["flops"] == peer_flops("vit_b_32", 64)[0]
    assert bad["status"] == "error" and "divisible by its patch size 32" in bad["error"]
    with pytest.raises(ValueError, match="random weights"):
        profile([], [64], compare=["vit_b_32:DEFAULT"], runner=fake)


def test_peer_flops_of_a_vit_grow_with_its_token_count():
    base, _ = peer_flops("vit_b_32", 224)  # 49 patch tokens + class token
    big, params = peer_flops("vit_b_32", 448)  # 196 + 1: the linear layers 4x, attention 16x
    assert 3.9 < big / base < 4.2
    assert params > peer_flops("vit_b_32", 224)[1]  # the larger position grid


def test_cli_scaling_json_and_plot_with_a_vit(tmp_path, one_thread):
    out_png = tmp_path / "cost.png"
    result = runner.invoke(app, [
        "profile", "-m", "vmamba-tiny", "-r", "32", "64", "96", "--compare", "vit_b_32", "--warmup", "0",
        "--iters", "1", "--no-scan-bandwidth", "--threads", "1", "--json", "--plot", str(out_png)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [(r["model"], r["resolution"], r["status"]) for r in doc["rows"]] == [
        ("vmamba-tiny-s1l8", 32, "ok"), ("vmamba-tiny-s1l8", 64, "ok"), ("vmamba-tiny-s1l8", 96, "ok"),
        ("vit_b_32", 32, "ok"), ("vit_b_32", 64, "ok"), ("vit_b_32", 96, "ok")]
    scaling = doc["scaling"]
    assert scaling["reference"] == "vmamba-tiny-s1l8"
    for entry in scaling["models"]:
        assert entry["resolutions"] == [32, 64, 96]
        assert isinstance(entry["time_exponent"], float) and entry["time_fit"]["points"] == 3
        mine = [r for r in doc["rows"] if r["model"] == entry["model"]]
        expected = fit_exponent([r["resolution"] ** 2 for r in mine], [r["flops"] for r in mine])["exponent"]
        assert entry["flops_exponent"] == pytest.approx(expected) and entry["flops_fit"]["points"] == 3
        assert "memory_exponent" in entry
    assert 0.95 < scaling["models"][0]["flops_exponent"] < 1.05  # VMamba: linear in pixel count
    (vit,) = scaling["crossovers"]
    assert vit["model"] == "vit_b_32" and vit["reference"] == "vmamba-tiny-s1l8"
    for field in ("images_per_s", "peak_memory_mb"):
        assert vit[field]["status"] in ("ahead_throughout", "overtakes", "behind_at_largest", "no_data")
        assert {"resolution", "estimated_resolution", "advantage"} <= set(vit[field])
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
