import os

# The Triton interpreter must be chosen before triton is first imported (machine-facts §1). On a
# GPU machine, `VMAMBA_GPU_TESTS=1 python -m pytest tests/test_gpu.py` runs the real kernels instead
# (the interpreter-only tests then skip themselves).
if os.environ.get("VMAMBA_GPU_TESTS", "0") in ("", "0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES
