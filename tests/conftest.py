import json
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # weights.py and inpaint.py live at the top level


@pytest.fixture(scope="session")
def expected():
    """The golden tensors of tests/golden/README.md."""
    return load_file(GOLDEN / "expected.safetensors")


@pytest.fixture(scope="session")
def runs():
    """Settings of the golden runs run_a, run_b, run_c."""
    with safe_open(GOLDEN / "expected.safetensors", framework="pt") as f:
        return json.loads(f.metadata()["runs"])


@pytest.fixture(scope="session")
def tiny():
    """The tiny golden checkpoint, float32 on the CPU."""
    from weights import load_models

    return load_models(GOLDEN / "tiny-sd", "cpu", "float32")
