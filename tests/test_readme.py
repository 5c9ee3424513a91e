"""Every ```python block of README.md runs as written (each in a fresh interpreter)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path):
    script = tmp_path / f"readme_{index}.py"
    script.write_text(BLOCKS[index])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"README block {index} failed:\n{BLOCKS[index]}\n{proc.stderr[-3000:]}"


def test_quickstart_commands_are_what_ci_runs():
    """The README's two commands (set-up + benchmark, tests) are the ones .ci/run runs on a fresh machine."""
    readme = (ROOT / "README.md").read_text()
    quick = re.search(r"## Quickstart\n+```bash\n(.*?)```", readme, flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in quick.splitlines() if line.strip()]
    assert commands == ["bash tools/setup.sh && python -m mmfast.bench", "python -m pytest -q -n 2"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^MMFAST_REQUIREMENTS=requirements-ci.txt bash tools/setup.sh$", ci, flags=re.M)
    assert re.search(r"^python -m pytest -q -n 2\b", ci, flags=re.M)
    assert "pip install -e ." in (ROOT / "tools" / "setup.sh").read_text()
