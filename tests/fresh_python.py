"""Running a snippet in a fresh interpreter: for what depends on a process's import order or first calls."""

from __future__ import annotations

import json
import subprocess
import sys


def python_json(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line, returned here."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])
