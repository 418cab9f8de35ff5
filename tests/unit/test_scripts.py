"""`scripts/install`, `scripts/serve` and `scripts/test` in a copy of the project whose `.venv` holds a
stand-in for pip (a real install takes minutes): what each prints, when it installs, and its stamp."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Records its arguments; for llama-cpp-python prints a build as pip --verbose streams it (Ninja's
# `[n/m]` and CMake's `[ n%]` both occur); FAIL_PIP makes it fail the way pip does.
FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/../calls"
case "$*" in
  *llama-cpp-python*)
    echo "Collecting llama-cpp-python>=0.3.16"
    echo "Building wheel for llama-cpp-python (pyproject.toml): started"
    echo "  *** Configuring CMake..."
    echo "  -- The C compiler identification is GNU 14.2.1"
    for i in $(seq 1 20); do echo "  [$i/40] Building C object vendor/llama.cpp/ggml/src/x$i.c.o"; done
    echo "[ 75%] Building CXX object src/llama.cpp.o"
    echo "[ 77%] Building CXX object src/llama-model.cpp.o"
    echo "[100%] Linking CXX shared library libllama.so"
    echo "Successfully installed llama-cpp-python-0.3.16" ;;
  *"-e ."*)
    [ -n "${FAIL_PIP:-}" ] && { echo "ERROR: No matching distribution found for nothing"; exit 1; }
    echo "Obtaining file:///project"
    echo "Requirement already satisfied: click>=8.1 in ./.venv/lib/python3.11/site-packages"
    echo "Successfully installed tokentill-0.1.0" ;;
esac
"""


def _executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    _executable(tmp_path / ".venv" / "bin" / "python", FAKE_PYTHON)
    return tmp_path


def _run(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(project / "scripts" / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **env},
    )


def _calls(project: Path) -> list[str]:
    path = project / ".venv" / "calls"
    return path.read_text().splitlines() if path.exists() else []


def test_install_shows_the_llama_cpp_compile_and_pip(project: Path) -> None:
    result = _run(project, "install")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "==> llama-cpp-python>=0.3.16 (compiled from source the first time" in out
    shown = [line.strip() for line in out.splitlines() if "compiling llama.cpp" in line]
    percents = [int(line.removeprefix("compiling llama.cpp: ").removesuffix("%")) for line in shown]
    # At most one line per 5 % step, from Ninja's counts and CMake's percentages alike, in order.
    assert percents == [2, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 75, 100], shown
    assert "    Building wheel for llama-cpp-python (pyproject.toml): started" in out
    assert "    *** Configuring CMake..." in out and "compiler identification" not in out
    assert "    Successfully installed tokentill-0.1.0" in out  # pip's own output, not --quiet
    assert "Requirement already satisfied" not in out
    assert (
        "Building C object" not in out and "Building C object" in (project / ".venv/install.log").read_text()
    )
    assert [c for c in _calls(project) if "--quiet" in c and "-e" in c.split()] == []


def test_serve_and_test_install_only_when_pyproject_changed(project: Path) -> None:
    _executable(project / ".venv" / "bin" / "tokentill", '#!/usr/bin/env bash\necho "tokentill $*"\n')
    first = _run(project, "serve", "--port", "9")
    assert first.returncode == 0 and first.stdout.rstrip().endswith("tokentill serve --port 9"), first
    assert "==> tokentill\n" in first.stdout and len(_calls(project)) == 3  # pip, llama, tokentill
    again = _run(project, "serve")
    assert "up to date with pyproject.toml; not reinstalling" in again.stdout
    assert again.stdout.rstrip().endswith("tokentill serve") and len(_calls(project)) == 3
    # The test extra was never installed: scripts/test installs it, which covers the service too.
    tested = subprocess.run(
        ["bash", "-c", "sed -i 's|^exec .*|echo ran tests|' scripts/test && scripts/test"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert tested.returncode == 0 and "==> tokentill [test]" in tested.stdout, tested
    assert any(".[test]" in c for c in _calls(project))
    count = len(_calls(project))
    assert "up to date" in _run(project, "install", "--if-changed").stdout
    assert "up to date" in _run(project, "install", "--if-changed", "test").stdout
    assert len(_calls(project)) == count
    # Any change to pyproject.toml (a new dependency) installs again; a plain `install` always does.
    with (project / "pyproject.toml").open("a") as f:
        f.write("\n# changed\n")
    assert "==> tokentill\n" in _run(project, "install", "--if-changed").stdout
    assert len(_calls(project)) == count + 3
    assert "==> tokentill\n" in _run(project, "install").stdout


def test_a_failed_install_shows_the_log_and_leaves_no_stamp(project: Path) -> None:
    _executable(project / ".venv" / "bin" / "tokentill", "#!/usr/bin/env bash\n")
    result = _run(project, "install", "--if-changed", FAIL_PIP="1")
    assert result.returncode != 0
    assert "install failed; the end of .venv/install.log:" in result.stderr
    assert "No matching distribution found" in result.stderr
    assert not (project / ".venv" / ".installed-service").exists()
    assert _run(project, "install", "--if-changed").returncode == 0  # tried again, not skipped
    assert (project / ".venv" / ".installed-service").exists()
    assert _run(project, "install", "nonsense").returncode == 2
