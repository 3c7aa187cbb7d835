"""Slow tier: the package installs from this repository (``uv pip install .``) into a fresh environment, and its worker runs from there.

The templates travel inside the package: the worker renders its prompts from the installed copy,
from a folder that is not the repository, with no ``VQA_PROMPTS_DIR``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from testkit.data import MODEL, make_jpeg
from testkit.openai_server import OpenAITestServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_the_package_installs_with_its_templates_and_its_worker_runs(vlm_server: OpenAITestServer, tmp_path: Path) -> None:
    uv = str(Path(sys.executable).with_name("uv"))
    venv = tmp_path / "venv"
    subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
    install = subprocess.run(
        [
            uv,
            "pip",
            "install",
            "--quiet",
            "--python",
            str(venv / "bin" / "python"),
            "-c",
            str(ROOT / "constraints.txt"),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    files = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import vqa_operators, pathlib; print(pathlib.Path(vqa_operators.__file__).parent)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout.strip()
    package = Path(files)
    assert package.is_relative_to(venv) and (package / "include" / "prompts" / "image_qa" / "user.j2").exists()
    assert (package / "include" / "report" / "preview.html.j2").exists()

    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "a.jpg").write_bytes(make_jpeg((64, 48)))
    (tmp_path / "work" / "in.jsonl").write_text(json.dumps({"image": "a.jpg"}) + "\n")
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "VQA_BASE_URL": vlm_server.base_url,
        "VQA_MODEL": MODEL,
        "HOME": str(tmp_path),
    }
    proc = subprocess.run(
        [
            "vqa-worker",
            "run",
            "image_qa",
            "--input",
            "in.jsonl",
            "--output",
            "out.jsonl",
            "--media-root",
            ".",
            "--param",
            "pairs_per_row=1",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path / "work",
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads(proc.stdout.strip().splitlines()[-1])
    row = json.loads((tmp_path / "work" / "out.jsonl").read_text())
    # the installed prompts are the repository's: the same hash as the source tree's
    from vqa_operators.prompts import load_prompts

    assert (
        manifest["rows_out"] == 1
        and manifest["prompt_sha256"] == load_prompts("image_qa").sha256 == row["vqa_provenance"]["image_qa"]["prompt_sha256"]
    )
