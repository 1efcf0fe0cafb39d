"""`import qtune` sets libgomp's wait settings before torch loads (sleeping threads after a short
bounded spin, see qtune/__init__.py), and leaves values the user set alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SHOW = "import json, os, qtune; print(json.dumps([os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT')]))"


def settings(**env) -> list:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", SHOW], env={**base, **env}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_import_qtune_sets_a_passive_policy_with_a_bounded_spin():
    assert settings() == ["PASSIVE", "10000"]


def test_values_the_user_set_are_kept():
    assert settings(OMP_WAIT_POLICY="ACTIVE") == ["ACTIVE", "10000"]
    assert settings(GOMP_SPINCOUNT="0") == ["PASSIVE", "0"]
