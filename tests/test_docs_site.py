"""The documentation site builds in strict mode (a broken link, a missing page or an API entry
that does not resolve is an error), with the four notebooks and the API reference rendered."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")

ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    for page in ("notebooks/fuse_gcnet", "notebooks/own_block", "notebooks/inside_the_compiler",
                 "notebooks/train_fuse_export", "notebooks/why_not", "why_not", "api", "api-gcnet", "export"):
        assert (site / page / "index.html").is_file(), page
    api = (site / "api" / "index.html").read_text()
    assert 'id="reparam.fuse.fuse"' in api and 'id="reparam.export.to_onnx"' in api
