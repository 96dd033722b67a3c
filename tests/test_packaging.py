"""What a non-editable install gets: the wheel holds every module of the package and the
presets, and nothing the library needs lies outside it (the kill trials launch the installed
training command, not the checkout's scripts/)."""

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from moejax.config import CONFIG_DIR
from moejax.model import cpu_kernels
from moejax.tools import kill_trials

REPO = Path(__file__).resolve().parent.parent


def test_wheel_holds_every_module_and_preset(tmp_path):
    # a copy of what the build reads, so that the build leaves nothing in the checkout
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source)
    shutil.copytree(REPO / "moejax", source / "moejax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", *isolation,
                    "--wheel-dir", str(tmp_path), str(source)], check=True,
                   capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("moejax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    package = REPO / "moejax"
    modules = {p.relative_to(REPO).as_posix() for p in package.rglob("*.py")}
    presets = {p.relative_to(REPO).as_posix() for p in package.glob("configs/*.yaml")}
    assert modules <= names, sorted(modules - names)
    assert presets <= names and "moejax/configs/tiny.yaml" in presets, sorted(presets - names)
    for source in (*cpu_kernels.HEADERS, *cpu_kernels.SOURCES):  # built on first use
        assert f"moejax/model/csrc/{source}" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "moejax-train = moejax.training.cli:main" in zipfile.ZipFile(wheel).read(
        entry_points).decode()


def test_presets_and_the_training_command_come_from_the_package():
    assert CONFIG_DIR.parent == REPO / "moejax"
    assert (REPO / "configs").resolve() == CONFIG_DIR.resolve()
    assert kill_trials.TRAIN_COMMAND[1:] == ["-m", "moejax.training.cli"]
