"""Static int8 through OpenVINO (`tests/modeling/openvino_cases.py`), run in a pytest process of its
own: once openvino is imported, a later Milvus Lite test in the same process under pytest's
fd-level capture finds sys.stderr closed, so these cases never share a worker with the others."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

# found, not imported: importing openvino here is what the separate process avoids
if importlib.util.find_spec("openvino") is None or importlib.util.find_spec("nncf") is None:
    pytest.skip("needs qtune[openvino]", allow_module_level=True)

CASES = Path(__file__).with_name("openvino_cases.py")


def test_openvino_cases_pass_in_their_own_process():
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", str(CASES)],
                          cwd=CASES.parents[2], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "5 passed" in done.stdout, done.stdout[-2000:]
