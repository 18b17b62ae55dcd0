"""Throw broken images and checkpoints at `vmamba predict` / `convert` / `eval` and count the outcomes.

Generates, in a temporary folder, a few hundred damaged inputs of known classes:

* images: every format and mode Pillow writes, odd sizes, truncated, bit-flipped, empty, text named
  ``.jpg``, decompression bombs (a small file whose header claims 100000x100000 or 65535x65535),
  FIFOs, dangling links, folders named like images;
* checkpoints (built from a small model, so runs are quick): valid controls, a valid file whose
  safetensors header length begins with byte 0x80, truncated and bit-flipped safetensors / ``.pth``,
  an 80-byte ``.pth``, a zip that is no torch archive, malformed ``config`` metadata, NaN / Inf
  weights, FIFOs, dangling links;

then runs each command on them in a subprocess with a timeout and prints, per command and class,
how many runs ended in: ``ok`` (exit 0), ``clean`` (non-zero exit with nothing but ``error:`` lines
on stderr, or eval's documented exit 3 listing unreadable images; no traceback), ``messy`` (non-zero exit, other stderr text), ``traceback``, ``hang`` (killed
at the timeout) and ``crash`` (killed by a signal). Classes that must be refused also count
``accepted`` (exit 0 on a broken input). Image batches go through ``predict --json`` together with
two good images, so a batch that dies also shows as good images lost.

    PYTHONPATH=. python benchmarks/fuzz_inputs.py --seconds 180 --count 120

``--seconds`` bounds the whole sweep (runs not started by then are counted as skipped), ``--count``
the number of generated inputs (roughly split between images and checkpoints), ``--timeout`` one run.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

OUTCOMES = ("ok", "clean", "messy", "traceback", "hang", "crash", "skipped")


@dataclass
class Case:
    command: str                 # predict | convert | eval
    cls: str                     # input class, e.g. "image/bomb" or "ckpt/truncated"
    args: list[str]
    must_fail: bool              # exit 0 on this input counts as "accepted"
    bad_inputs: int = 1          # error lines a clean run prints
    good_images: int = 0         # good images in a predict batch (counted as lost when the run dies)
    outcome: str = "skipped"
    detail: str = ""
    lost_good: int = 0


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------

_FORMATS = (("PNG", ".png"), ("JPEG", ".jpg"), ("BMP", ".bmp"), ("GIF", ".gif"), ("TIFF", ".tif"),
            ("WEBP", ".webp"), ("PPM", ".ppm"), ("ICO", ".ico"), ("TGA", ".tga"), ("PCX", ".pcx"))
_MODES = ("RGB", "L", "RGBA", "P", "1", "LA", "I", "F", "CMYK", "I;16")


def _encode(image, fmt: str) -> bytes | None:
    buf = io.BytesIO()
    try:
        image.save(buf, format=fmt)
    except Exception:  # noqa: BLE001 - this format cannot store this mode
        return None
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bombs() -> dict[str, bytes]:
    """Small files whose headers claim enormous images."""
    from PIL import Image

    out = {}
    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
    out[".png"] = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
                   + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 3000)) + _png_chunk(b"IEND", b""))
    bmp = bytearray(_encode(Image.new("RGB", (8, 8), (9, 9, 9)), "BMP"))
    bmp[18:26] = struct.pack("<ii", 100000, 100000)
    out[".bmp"] = bytes(bmp)
    gif = bytearray(_encode(Image.new("P", (8, 8)), "GIF"))
    gif[6:10] = struct.pack("<HH", 65535, 65535)
    descriptor = gif.index(b"\x2c", 13)
    gif[descriptor + 5:descriptor + 9] = struct.pack("<HH", 65535, 65535)
    out[".gif"] = bytes(gif)
    jpg = bytearray(_encode(Image.new("RGB", (8, 8), (200, 10, 10)), "JPEG"))
    sof = jpg.index(b"\xff\xc0")
    jpg[sof + 5:sof + 9] = struct.pack(">HH", 65535, 65535)
    out[".jpg"] = bytes(jpg)
    return out


def make_images(root: Path, count: int, rng: random.Random) -> dict[str, list[Path]]:
    """Image inputs by class under ``root``; ``good`` are controls."""
    from PIL import Image

    classes: dict[str, list[Path]] = collections.defaultdict(list)
    root.mkdir(parents=True)

    def put(cls: str, name: str, data: bytes) -> Path:
        path = root / f"{cls}-{len(classes[cls]):03d}-{name}"
        path.write_bytes(data)
        classes[cls].append(path)
        return path

    base = Image.new("RGB", (37, 29))
    base.putdata([((x * 7) % 256, (y * 5) % 256, (x * y) % 256) for y in range(29) for x in range(37)])
    encoded = []
    for fmt, ext in _FORMATS:
        for mode in _MODES:
            try:
                image = base.convert(mode)
            except Exception:  # noqa: BLE001 - no conversion to this mode
                continue
            data = _encode(image, fmt)
            if data is not None:
                encoded.append((f"{mode.replace(';', '')}{ext}", data))
    per_class = max(2, count // 10)
    for name, data in rng.sample(encoded, min(len(encoded), per_class * 2)):
        put("formats", name, data)
    for w, h in [(1, 1), (4000, 3), (3, 4000), (2, 2), (1, 300), (5000, 1)][:per_class]:
        put("odd-size", f"{w}x{h}.png", _encode(Image.new("RGB", (w, h), (1, 2, 3)), "PNG"))
    for i in range(per_class):
        name, data = rng.choice(encoded)
        put("truncated", name, data[: rng.randint(0, max(1, len(data) - 1))])
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        put("bit-flipped", name, bytes(flipped))
    put("empty", "empty.jpg", b"")
    put("empty", "empty.png", b"")
    put("text", "notes.jpg", b"this is not an image\n" * 20)
    put("text", "page.png", b"<html><body>hello</body></html>\n")
    for ext, data in _bombs().items():
        put("bomb", f"bomb{ext}", data)
    fifo = root / "fifo-000-x.jpg"
    os.mkfifo(fifo)
    classes["fifo"].append(fifo)
    link = root / "dangling-000-x.jpg"
    link.symlink_to(root / "no-such-target.jpg")
    classes["dangling-link"].append(link)
    folder = root / "folder-000-x.jpg"
    folder.mkdir()
    classes["directory"].append(folder)
    for i in range(2):
        good = root / f"good-{i}.png"
        good.write_bytes(_encode(base, "PNG"))
        classes["good"].append(good)
    return dict(classes)


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------

def _small_model():
    import torch

    from vmamba_cli.model import VMambaConfig, VSSM

    torch.manual_seed(0)
    return VSSM(VMambaConfig(dims=(8, 16), depths=(1, 1), num_classes=2, d_state=1))


def _header_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def _write_ours(path: Path, model, *, config=None, tensors=None, pad: str = "") -> Path:
    """One of our safetensors files; ``config`` replaces the stored config (JSON text or any value)."""
    from safetensors.torch import save_file

    from vmamba_cli.weights import save_model

    save_model(path, model, class_names=["a", "b"], extra={"pad": pad} if pad else None)
    if config is None and tensors is None:
        return path
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
        stored = {k: f.get_tensor(k) for k in f.keys()}
    if config is not None:
        metadata["config"] = config if isinstance(config, str) else json.dumps(config)
    save_file(tensors if tensors is not None else stored, str(path), metadata=metadata)
    return path


def make_checkpoints(root: Path, count: int, rng: random.Random) -> dict[str, list[Path]]:
    import torch

    root.mkdir(parents=True)
    classes: dict[str, list[Path]] = collections.defaultdict(list)
    model = _small_model()

    def add(cls: str, path: Path) -> Path:
        classes[cls].append(path)
        return path

    good = add("valid", _write_ours(root / "valid.safetensors", model))
    for pad in range(1, 400):  # a valid file whose header length's low byte is 0x80
        path = _write_ours(root / "valid-0x80.safetensors", model, pad="x" * pad)
        if _header_length(path) & 0xFF == 0x80:
            add("valid-0x80", path)
            break
    pth = root / "official.pth"
    torch.save({"model": model.state_dict(), "epoch": 3}, pth)
    legacy = root / "legacy.pth"
    torch.save({"model": model.state_dict()}, legacy, _use_new_zipfile_serialization=False)

    n = max(2, count // 12)
    sources = [good, classes["valid-0x80"][0] if classes["valid-0x80"] else good, pth, legacy]
    for i in range(n):
        src = sources[i % len(sources)]
        data = src.read_bytes()
        cut = root / f"truncated-{i}{src.suffix}"
        cut.write_bytes(data[: rng.choice([1, 8, 9, 80, rng.randrange(len(data))])])
        add("truncated", cut)
        flip = bytearray(data)
        span = rng.choice([(0, 64), (0, len(data))])  # header region or anywhere
        for _ in range(rng.randint(1, 6)):
            flip[rng.randrange(*span)] ^= 1 << rng.randrange(8)
        flipped = root / f"bitflip-{i}{src.suffix}"
        flipped.write_bytes(bytes(flip))
        add("bit-flipped", flipped)
    add("80-byte-pth", root / "short.pth").write_bytes(pth.read_bytes()[:80])
    add("empty", root / "empty.pth").write_bytes(b"")
    add("empty", root / "empty.safetensors").write_bytes(b"")
    add("text", root / "notes.pth").write_text("not a checkpoint\n")
    for name in ("other-zip.safetensors", "other-zip.pth"):
        with zipfile.ZipFile(root / name, "w") as z:
            z.writestr("readme.txt", "hello " * 100)
        add("non-torch-zip", root / name)
    base_cfg = model.config.to_dict()
    bad_configs = {
        "null": None, "number": 3, "list": [1, 2], "string": "abc", "not-json": "{dims: [8",
        "unknown-key": {**base_cfg, "colour": "blue"}, "negative-dims": {**base_cfg, "dims": [-8, 16]},
        "huge-dims": {**base_cfg, "dims": [8, 1 << 20]}, "huge-depths": {**base_cfg, "depths": [1, 100000]},
        "huge-classes": {**base_cfg, "num_classes": 10 ** 9}, "wrong-type": {**base_cfg, "depths": "1,1"},
        "length-mismatch": {**base_cfg, "depths": [1, 1, 1]},
    }
    for label, cfg in bad_configs.items():
        value = cfg if isinstance(cfg, str) else json.dumps(cfg)
        add("bad-config", _write_ours(root / f"config-{label}.safetensors", model, config=value))
    nan = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    add("non-finite", _write_ours(root / "all-nan.safetensors", model, tensors=nan))
    inf = dict(model.state_dict())
    inf["classifier.head.weight"] = torch.full_like(inf["classifier.head.weight"], float("inf"))
    add("non-finite", _write_ours(root / "inf-head.safetensors", model, tensors=inf))
    for name in ("fifo.pth", "fifo.safetensors"):
        os.mkfifo(root / name)
        add("fifo", root / name)
    (root / "dangling.pth").symlink_to(root / "missing.pth")
    add("dangling-link", root / "dangling.pth")
    (root / "folder.pth").mkdir()
    add("directory", root / "folder.pth")
    return dict(classes)


def make_eval_folder(root: Path, image: Path) -> Path:
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        shutil.copy(image, root / cls / "0.png")
    return root


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------

def classify(rc: int | None, stderr: str, case: Case) -> tuple[str, str]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    if rc is None:
        return "hang", ""
    if "Traceback (most recent call last)" in stderr:
        last = next((line for line in reversed(lines) if line and not line.startswith(" ")), "")
        return "traceback", last[:160]
    if rc < 0:
        return "crash", f"signal {-rc}"
    if rc == 0:
        return "ok", ""
    if case.command == "eval" and rc == 3:  # documented: finished, the unreadable images listed
        return "clean", next((line for line in lines if "could not" in line or "error" in line), "")[:160]
    errors = [line for line in lines if line.startswith("error:")]
    if errors and len(errors) == len(lines):
        return "clean", errors[0][:160]
    return "messy", (lines[0] if lines else f"exit {rc}, no message")[:160]


def run_case(case: Case, python: str, env: dict, timeout: float, deadline: float) -> Case:
    if time.monotonic() > deadline:
        return case
    proc = subprocess.Popen([python, "-m", "vmamba_cli", *case.args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
                            errors="replace", start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        rc = None
    case.outcome, case.detail = classify(rc, stderr, case)
    if case.good_images:
        try:
            report = json.loads(stdout)
            predicted = {Path(p["path"]).name for p in report.get("predictions", [])}
            case.lost_good = sum(1 for name in ("good-0.png", "good-1.png") if name not in predicted)
        except (ValueError, AttributeError, TypeError):
            case.lost_good = case.good_images
    return case


def build_cases(images: dict[str, list[Path]], ckpts: dict[str, list[Path]], work: Path) -> list[Case]:
    cases = []
    good_weights = str(ckpts["valid"][0])
    good_images = [str(p) for p in images["good"]]
    common = ["--device", "cpu", "--resolution", "64"]
    for cls, paths in images.items():
        if cls == "good":
            continue
        # predict: the class's files plus two good images, in one batch.
        cases.append(Case("predict", f"image/{cls}",
                          ["predict", "--json", "--weights", good_weights, *common, *map(str, paths), *good_images],
                          must_fail=cls not in ("formats", "odd-size", "bit-flipped"),
                          bad_inputs=len(paths), good_images=2))
        folder = make_eval_folder(work / "eval-images" / cls, images["good"][0])
        for path in paths:
            target = folder / "a" / path.name
            if path.is_symlink():
                target.symlink_to(os.readlink(path))
            elif path.is_dir():
                target.mkdir()
            elif not path.is_file():
                os.mkfifo(target)
            else:
                shutil.copy(path, target)
        cases.append(Case("eval", f"image/{cls}", ["eval", str(folder), "--weights", good_weights, "--device", "cpu",
                                                    "--resolution", "64", "--workers", "0"],
                          must_fail=False, bad_inputs=len(paths)))
    eval_data = make_eval_folder(work / "eval-ckpt", images["good"][0])
    for cls, paths in ckpts.items():
        must_fail = cls not in ("valid", "valid-0x80", "bit-flipped")
        for i, path in enumerate(paths):
            cases.append(Case("predict", f"ckpt/{cls}", ["predict", "--weights", str(path), *common, good_images[0]],
                              must_fail=must_fail))
            cases.append(Case("convert", f"ckpt/{cls}", ["convert", str(path), str(work / f"out-{cls}-{i}.safetensors"),
                                                         "--model", "vmamba-tiny"], must_fail=must_fail))
            cases.append(Case("eval", f"ckpt/{cls}", ["eval", str(eval_data), "--weights", str(path), "--device", "cpu",
                                                      "--resolution", "64", "--workers", "0"], must_fail=must_fail))
    return cases


def _round_robin(cases: list[Case]) -> list[Case]:
    """Order runs so that every (command, class) gets its first run before any gets its second: when
    the time budget runs out, what is skipped are further variants, not whole classes."""
    groups: dict[tuple[str, str], list[Case]] = collections.OrderedDict()
    for case in cases:
        groups.setdefault((case.command, case.cls), []).append(case)
    ordered = []
    for i in range(max(map(len, groups.values()), default=0)):
        ordered += [group[i] for group in groups.values() if i < len(group)]
    return ordered


def report(cases: list[Case], out=sys.stdout) -> None:
    header = f"{'command':8} {'class':24} {'runs':>4} " + " ".join(f"{o:>9}" for o in OUTCOMES) + \
             f" {'accepted':>8} {'lost-good':>9}"
    print(header, file=out)
    print("-" * len(header), file=out)
    groups = collections.OrderedDict()
    for case in sorted(cases, key=lambda c: (c.command, c.cls)):
        groups.setdefault((case.command, case.cls), []).append(case)
    totals = collections.Counter()
    for (command, cls), group in groups.items():
        counts = collections.Counter(c.outcome for c in group)
        accepted = sum(1 for c in group if c.must_fail and c.outcome == "ok")
        lost = sum(c.lost_good for c in group)
        totals.update(counts)
        totals["accepted"] += accepted
        totals["runs"] += len(group)
        print(f"{command:8} {cls:24} {len(group):>4} " + " ".join(f"{counts[o]:>9}" for o in OUTCOMES)
              + f" {accepted:>8} {lost:>9}", file=out)
    print("-" * len(header), file=out)
    print(f"{'total':8} {'':24} {totals['runs']:>4} " + " ".join(f"{totals[o]:>9}" for o in OUTCOMES)
          + f" {totals['accepted']:>8}", file=out)
    notable = [c for c in cases if c.outcome in ("traceback", "hang", "crash", "messy")
               or (c.must_fail and c.outcome == "ok")]
    if notable:
        print("\nfirst problems (command, class, outcome, last line):", file=out)
        seen = set()
        for c in notable:
            key = (c.command, c.cls, c.outcome, c.detail)
            if key in seen:
                continue
            seen.add(key)
            print(f"  {c.command:8} {c.cls:24} {c.outcome if c.outcome != 'ok' else 'accepted':9} {c.detail}", file=out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="Budget for the whole sweep.")
    parser.add_argument("--count", type=int, default=200, help="About how many inputs to generate.")
    parser.add_argument("--timeout", type=float, default=60.0, help="Seconds before one run counts as a hang.")
    parser.add_argument("--jobs", type=int, default=3, help="Runs at a time (hangs wait, they do not compute).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--commands", default="predict,convert,eval", help="Comma-separated subset.")
    parser.add_argument("--kinds", default="image,ckpt", help="Input kinds to run: image, ckpt or both.")
    parser.add_argument("--keep", type=Path, default=None, help="Generate into this folder and keep it.")
    args = parser.parse_args(argv)

    start = time.monotonic()
    deadline = start + args.seconds
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="vmamba-fuzz-")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    try:
        images = make_images(work / "images", args.count // 2, rng)
        ckpts = make_checkpoints(work / "checkpoints", args.count // 2, rng)
        wanted, kinds = set(args.commands.split(",")), set(args.kinds.split(","))
        cases = _round_robin([c for c in build_cases(images, ckpts, work)
                              if c.command in wanted and c.cls.split("/")[0] in kinds])
        n_images = sum(len(v) for v in images.values())
        n_ckpts = sum(len(v) for v in ckpts.values())
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        env.pop("TRITON_INTERPRET", None)
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda c: run_case(c, sys.executable, env, args.timeout, deadline), cases))
        print(f"fuzz_inputs: {n_images} images, {n_ckpts} checkpoints, {len(cases)} runs in "
              f"{time.monotonic() - start:.0f} s (timeout {args.timeout:g} s per run, seed {args.seed})")
        report(cases)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
