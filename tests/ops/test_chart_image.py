"""Static checks of charts/image/Dockerfile (no Docker engine in CI).

What a build would catch first is checked without one: every COPY source
exists and survives the .dockerignore, the two variants resolve to real base
stages, the entry point is the `tenax` console script, the user is the one the
chart runs as, and the files the Dockerfile copies are enough to build the
package (a wheel is built from exactly those files).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
import zipfile
from fnmatch import fnmatch
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
IMAGE_DIR = REPO / "charts" / "image"
DOCKERFILE = IMAGE_DIR / "Dockerfile"
DOCKERIGNORE = IMAGE_DIR / "Dockerfile.dockerignore"  # BuildKit's per-Dockerfile ignore file
VALUES = yaml.safe_load((REPO / "charts" / "tenax" / "values.yaml").read_text())
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continuation line"
    return out


def global_args() -> dict[str, str]:
    """ARGs declared before the first FROM (usable in FROM lines), with defaults."""
    args = {}
    for word, rest in instructions():
        if word == "FROM":
            break
        if word == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
    return args


def stages() -> dict[str, str]:
    """Stage name -> base image, with global ARG defaults substituted."""
    args = global_args()
    out = {}
    for word, rest in instructions():
        if word == "FROM":
            parts = rest.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], parts[0])
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else f"#{len(out)}"
            out[name] = image
    return out


def final_stage_lines() -> list[tuple[str, str]]:
    lines = instructions()
    last_from = max(i for i, (word, _) in enumerate(lines) if word == "FROM")
    return lines[last_from + 1:]


def copy_sources() -> list[str]:
    sources = []
    for word, rest in instructions():
        if word == "COPY":
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            sources += parts[:-1]
    return sources


def ignored(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matches a path or any parent of it."""
    result = False
    for raw in DOCKERIGNORE.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pattern == "**":
            hit = True
        elif pattern.startswith("**/"):
            hit = any(fnmatch(p, pattern[3:]) for p in parts)
        else:
            hit = any(fnmatch(p, pattern) for p in prefixes)
        if hit:
            result = not negate
    return result


def test_variants_pick_a_cpu_and_a_cuda_base():
    args = global_args()
    assert args["VARIANT"] == "cpu"
    found = stages()
    final_from = [rest for word, rest in instructions() if word == "FROM"][-1]
    assert final_from.split()[0] == "base-${VARIANT}"
    assert found["base-cpu"].startswith("python:3.11-slim")
    assert found["base-cuda"].startswith("nvidia/cuda:") and "runtime" in found["base-cuda"]
    # Each variant installs torch from its own index.
    text = DOCKERFILE.read_text()
    assert "download.pytorch.org/whl/cpu" in text and "download.pytorch.org/whl/cu" in text


def test_copy_sources_exist_and_are_not_dockerignored():
    sources = copy_sources()
    assert sources
    for src in sources:
        path = REPO / src
        assert path.exists(), f"COPY {src}: not in the repository"
        files = [path] if path.is_file() else [p for p in path.rglob("*.py")]
        assert files, f"COPY {src}: nothing to copy"
        for f in files:
            assert not ignored(str(f.relative_to(REPO))), f"{f.relative_to(REPO)} is excluded by {DOCKERIGNORE.name}"
    # Caches and the virtualenv never enter the build context.
    assert ignored(".venv/bin/python") and ignored("controller/__pycache__/cli.cpython-311.pyc")


def test_copies_every_package_the_project_declares():
    includes = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = {Path(s).name for s in copy_sources()}
    for pattern in includes:
        assert pattern.rstrip("*") in copied, f"package {pattern} is not copied into the image"
    assert "pyproject.toml" in copied


def test_torch_version_comes_from_pyproject():
    # The torch layer reads the pin from pyproject.toml instead of repeating it.
    text = DOCKERFILE.read_text()
    assert not re.search(r"torch==\d", text), "the Dockerfile pins torch itself; read it from pyproject.toml"
    assert "pyproject.toml" in text and '["project"]["dependencies"]' in text
    assert any(d.startswith("torch") for d in PYPROJECT["project"]["dependencies"])


def test_entrypoint_is_the_tenax_console_script():
    final = final_stage_lines()
    (entrypoint,) = [rest for word, rest in final if word == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["tenax"]  # exec form: signals reach tenax directly
    assert PYPROJECT["project"]["scripts"]["tenax"] == "cli.main:main"
    assert any(word == "RUN" and "pip install /src" in rest for word, rest in final)


def test_runs_as_the_non_root_user_the_chart_expects():
    final = final_stage_lines()
    users = [rest for word, rest in final if word == "USER"]
    assert users, "no USER: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0  # numeric, so runAsNonRoot can verify it
    for component in (VALUES["controller"], VALUES["agent"], VALUES["etcd"]["bundled"]):
        assert component["podSecurityContext"]["runAsUser"] == int(uid)
        assert component["podSecurityContext"]["runAsGroup"] == int(gid)


def test_exposes_the_chart_ports():
    exposed = {int(p) for word, rest in final_stage_lines() if word == "EXPOSE" for p in rest.split()}
    assert exposed == {VALUES["controller"]["grpcPort"], VALUES["controller"]["metricsPort"],
                       VALUES["agent"]["httpPort"]}


def test_copied_files_build_the_package(tmp_path):
    """Build a wheel from exactly what the Dockerfile copies (as `pip install /src` would)."""
    context = tmp_path / "src"
    for src in copy_sources():
        path = REPO / src
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for f in files:
            rel = f.relative_to(REPO)
            if ignored(str(rel)):
                continue
            dest = context / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(f.read_bytes())
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(context)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "dist").glob("tenax-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert re.search(r"^tenax = cli\.main:main$", entry_points, re.M)
    for package in ("protos", "common", "controller", "agent", "trainer", "cli"):
        assert f"{package}/__init__.py" in names
