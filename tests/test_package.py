"""mmfast as a package: its metadata and console script, its requirements files, the backends table,
and what every entry point says when the extension is not built (a copy of the package without it)."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mmfast
from mmfast import _dispatch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements(name: str) -> dict[str, str]:
    """package name (lower case) -> its version specifier, from a requirements file."""
    out = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            pkg, spec = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", line).groups()
            out[pkg.lower().replace("_", "-")] = spec
    return out


def test_console_script_and_dependencies_declared():
    project = PYPROJECT["project"]
    target = project["scripts"]["mmfast-bench"]
    module, func = target.split(":")
    assert callable(getattr(importlib.import_module(module), func))
    deps = {re.match(r"[A-Za-z0-9_.\-]+", d).group(0): d for d in project["dependencies"]}
    assert "numpy" in deps  # torch warns on every import without it
    assert deps["torch"].startswith("torch>=")  # an open range: any build (CPU or CUDA wheel)


def test_versions_agree():
    setup_py = (ROOT / "setup.py").read_text()
    assert re.search(r'VERSION = "([^"]+)"', setup_py).group(1) == PYPROJECT["project"]["version"] == mmfast.__version__
    if _dispatch.extension()[0] is not None:
        assert mmfast.build_info()["version"] == mmfast.__version__


def test_requirements_open_for_users_pinned_for_ci():
    users, ci = _requirements("requirements.txt"), _requirements("requirements-ci.txt")
    assert not [p for p, spec in users.items() if "==" in spec], "requirements.txt must not pin exact versions"
    assert set(users) <= set(ci), f"missing from requirements-ci.txt: {set(users) - set(ci)}"
    loose = [p for p, spec in ci.items() if not spec.startswith("==") and p != "setuptools"]
    assert not loose, f"requirements-ci.txt must pin exact versions: {loose}"
    assert "requirements-ci.txt" in (ROOT / ".ci" / "run").read_text()


def test_installed_package_works_from_another_folder(tmp_path):
    """After tools/setup.sh (pip install -e .): mmfast imports from any folder, even one holding an
    empty folder named mmfast (a clone folder that would shadow it as a namespace package), and
    mmfast-bench is on PATH."""
    # Installed distributions record where they came from (direct_url.json); build metadata
    # (an mmfast.egg-info folder left in the checkout) does not.
    urls = [
        json.loads(d.read_text("direct_url.json") or "{}").get("url", "")
        for d in importlib.metadata.distributions(name="mmfast")
    ]
    paths = [Path(u.removeprefix("file://")).resolve() for u in urls if u.startswith("file://")]
    if ROOT not in paths:
        pytest.skip(
            f"this checkout is not pip-installed here (installed: {paths or 'none'}; tools/setup.sh installs it)"
        )
    (tmp_path / "mmfast").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import mmfast; print(mmfast.__file__, mmfast.__version__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == str(ROOT / "mmfast" / "__init__.py")
    script = shutil.which("mmfast-bench", path=str(Path(sys.executable).parent) + os.pathsep + env["PATH"])
    assert script, "mmfast-bench is not on PATH"
    proc = subprocess.run([script, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "usage: mmfast-bench" in proc.stdout, proc.stderr


def test_backends_table():
    table = mmfast.backends(pretty=True)
    assert isinstance(table, str)
    report = mmfast.backends()
    for op in report:
        line = next(ln for ln in table.splitlines() if ln.startswith(op + " "))
        cells = line.split()[1:]
        for name in _dispatch.BACKENDS:
            assert name in table.splitlines()[3]  # the header row
        assert cells.count("yes") + cells.count("no") == len(_dispatch.BACKENDS)
    for reason in {e["reason"] for row in report.values() for e in row.values() if e["reason"]}:
        assert reason in table
    assert "CPU:" in table and "AVX-512" in table
    proc = subprocess.run([sys.executable, "-m", "mmfast"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout == table, proc.stderr


def test_triton_without_gpu_is_interpreter_only(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    why = _dispatch.availability("triton")
    assert why and "no GPU" in why and "TRITON_INTERPRET=1" in why
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.availability("triton") is None
    note = mmfast.backends()["info_nce"]["triton"]["note"]
    assert "interpreter only" in note


def test_cpu_paths_follow_the_options():
    """The table's cpu paths are the extension's own choice, and follow mmfast.cpu_options."""
    from mmfast import _dispatch
    from mmfast._backends_table import cpu_paths

    ext = _dispatch.extension()[0]
    if not ext.cpu_isa()["avx512"]:
        pytest.skip("no AVX-512 here: the fp32 paths are MKL's and AVX2 tiles whatever the options")
    assert "own AVX-512 GEMM" in cpu_paths(ext)["info_nce, siglip_loss fp32"]
    assert "AVX-512 register tiles" in cpu_paths(ext)["cross_attention fp32"]
    with mmfast.cpu_options(gemm="avx2"):
        assert "MKL SGEMM" in cpu_paths(ext)["info_nce, siglip_loss fp32"]
        assert "AVX2 register tiles" in cpu_paths(ext)["cross_attention fp32"]
        assert "gemm='avx2'" in mmfast.backends(pretty=True)
    with mmfast.cpu_options(gemm="blas"):
        assert "generic kernel" in cpu_paths(ext)["cross_attention fp32"]
        assert "generic kernel" in cpu_paths(ext)["cross_attention bf16"]


# ------------------------------------------------------------------------------------------------
# Without the extension: a copy of the package with no mmfast._C in it.


@pytest.fixture(scope="module")
def unbuilt(tmp_path_factory):
    """Run Python code in a folder holding a copy of mmfast without its extension."""
    folder = tmp_path_factory.mktemp("unbuilt")
    shutil.copytree(ROOT / "mmfast", folder / "mmfast", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = str(folder)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=300)

    return run


NOT_BUILT = "the C++ extension mmfast._C is not built"


def test_without_extension_build_info_and_explicit_backends_say_how_to_build(unbuilt):
    code = """
import json, warnings, torch, mmfast
print(json.dumps(mmfast.build_info()))
x = torch.randn(8, 4)
for backend in ("cpu", "cuda"):
    try:
        mmfast.info_nce(x, x, 2.0, backend=backend)
    except RuntimeError as e:
        print(e)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    mmfast.cross_attention(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4))
print("WARNING", caught[0].message)
"""
    proc = unbuilt("-c", code)
    assert proc.returncode == 0, proc.stderr
    info, cpu_error, cuda_error, warning = proc.stdout.strip().splitlines()
    info = json.loads(info)
    assert info["extension"] is None and NOT_BUILT in info["reason"] and "pip install -e ." in info["reason"]
    for line in (cpu_error, cuda_error, warning):
        assert NOT_BUILT in line and "pip install -e ." in line, line
    assert "circular import" not in proc.stdout + proc.stderr


def test_without_extension_backends_table_says_not_built(unbuilt):
    proc = unbuilt("-m", "mmfast")
    assert proc.returncode == 0, proc.stderr
    assert f"mmfast._C: NOT AVAILABLE: {NOT_BUILT}" in proc.stdout
    assert re.search(r"^info_nce\s+no \[\d\]\s+no \[\d\]\s+no \[\d\]\s+yes$", proc.stdout, flags=re.M), proc.stdout


def test_without_extension_bench_refuses_and_lists_mmfast_cpu(unbuilt, tmp_path):
    proc = unbuilt("-m", "mmfast.bench", "--smoke", "--no-progress", "--out", str(tmp_path / "a"))
    assert proc.returncode == 2 and not proc.stdout
    assert "none of mmfast's kernels can run" in proc.stderr and NOT_BUILT in proc.stderr
    assert "mmfast-cpu" in proc.stderr and "--providers" in proc.stderr
    # Peers only, asked for by name: the table runs, and says why mmfast-cpu is not in it.
    args = ["--smoke", "--ops", "info_nce", "--modes", "fwd", "--providers", "torch-naive", "--no-progress"]
    proc = unbuilt("-m", "mmfast.bench", *args, "--budget", "5", "--out", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr
    not_run = next(ln for ln in proc.stdout.splitlines() if ln.startswith("Not run here:"))
    assert "mmfast-cpu" in not_run and NOT_BUILT in not_run
    row = next(ln for ln in proc.stdout.splitlines() if ln.startswith("| info_nce |"))
    assert "| torch-naive |" in row and "skipped" not in row, row
