"""The built wheel ships meta/ as flexattn_ops.meta and never as a top-level `meta` module."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_wheel_ships_meta_inside_the_package(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        timeout=300,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("flexattn_ops-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "flexattn_ops/meta/__init__.py" in names
    assert not any(n.startswith("meta/") for n in names), [n for n in names if n.startswith("meta/")]
    assert not any(n.startswith("tests/") for n in names)
