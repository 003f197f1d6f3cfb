"""Every sbatch line of README.md and slurm/README.md, copied out of the docs and run as written on
the real Slurm with `--test-only` added by a wrapper (it checks the options, the script's #SBATCH
lines and the resources against the cluster without running the job). The test cluster has no
GPUs: SBATCH_GPUS_PER_NODE=0 in the environment stands in for GPU nodes."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess

import pytest

from tests.conftest import REPO_ROOT

DOCS = ("README.md", "slurm/README.md")
pytestmark = pytest.mark.usefixtures("slurm_cluster")


def sbatch_commands(doc: str) -> list[str]:
    """The shell commands of `doc`'s bash blocks whose command word is sbatch (continuations joined)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (REPO_ROOT / doc).read_text(), flags=re.S):
        for command in re.sub(r"\\\n\s*", " ", block).splitlines():
            words = command.split("#", 1)[0].split()
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
                words = words[1:]
            if words and words[0] == "sbatch":
                commands.append(command.strip())
    return commands


def test_the_docs_have_sbatch_lines():
    assert len(sbatch_commands("README.md")) >= 1 and len(sbatch_commands("slurm/README.md")) >= 3


@pytest.mark.parametrize("doc, command", [(doc, c) for doc in DOCS for c in sbatch_commands(doc)],
                         ids=lambda value: value if value in DOCS else value.split("slurm/")[1].split()[0])
def test_doc_sbatch_line_is_accepted_as_written(tmp_path, doc, command):
    wrapper = tmp_path / "sbatch"
    wrapper.write_text(f'#!/bin/bash\nexec {shutil.which("sbatch")} --test-only "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "SBATCH_GPUS_PER_NODE": "0"}
    proc = subprocess.run(["bash", "-c", command], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "to start at" in proc.stderr, f"{doc}: {command}\n{proc.stderr}"
