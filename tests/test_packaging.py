"""The wheel that `pip install .` (and so the docker images) installs holds everything the
server needs to start on the bundled model, away from the source tree."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from tests.server_process import REPO_ROOT


def test_the_wheel_carries_every_package_and_the_bundled_model(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO_ROOT)],
                   check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("sinkserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {str(p.relative_to(REPO_ROOT)) for package in ("server", "scheduler", "model", "clients")
               for p in (REPO_ROOT / package).rglob("*.py")}
    assert sources <= names, sorted(sources - names)
    bundled = {str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "model" / "bundled" / "stories260K").iterdir()}
    assert {"model/bundled/stories260K/model.safetensors", "model/bundled/stories260K/tokenizer.model"} <= bundled
    assert bundled <= names, sorted(bundled - names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "sinkserve = server.__main__:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    assert not any(n.startswith("tests/") for n in names)
