"""Files the project writes get the mode a plain `open(path, "w")` would give, whatever the writer
library does: safetensors creates its file 0600, unreadable for colleagues on a shared cluster."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

WRITE = """
import sys, torch
from safetensors.torch import save_file
from var_train.fileio import atomic_write, write_json_atomic
with atomic_write(sys.argv[1] + "/weights.safetensors") as tmp:
    save_file({"w": torch.zeros(2)}, str(tmp))
write_json_atomic(sys.argv[1] + "/summary.json", {"a": 1})
"""


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, expected):
    # A new process: the module reads the umask once, when it is imported.
    proc = subprocess.run([sys.executable, "-c", f"import os; os.umask({umask}); exec({WRITE!r})", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    for name in ("weights.safetensors", "summary.json"):
        mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
        assert mode == expected, f"{name}: {oct(mode)}, expected {oct(expected)} under umask {oct(umask)}"
