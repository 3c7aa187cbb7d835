"""Build the worker images on this machine with podman (``make images``), each named by a digest of what it is built from.

- ``localhost/vqa-debian:bookworm``: the base, made from Debian's packages (debootstrap, then
  ``podman import``), since no registry can be reached here; a user builds on ``python:3.11-slim``.
- ``localhost/vqa-worker:<digest>``: ``docker/worker.Dockerfile`` on that base.
- ``localhost/vqa-worker-vllm-cpu:<digest>``: ``docker/worker-vllm-cpu.Dockerfile`` on the worker image.

An image whose digest is already in podman's storage is not built again: a run builds each image
once, and a machine that keeps its storage builds it only when its sources change. Prints, per
image, its tag, its size and the seconds its build took (0 when it was there already).

The GPU image (``docker/worker-vllm.Dockerfile``, on vLLM's CUDA image) cannot be built here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# podman's settings for this kind of machine (runc, rlimits, log format): see the file
CONTAINERS_CONF = ROOT / "docker" / "containers.conf"
PODMAN_ENV = {"CONTAINERS_CONF": str(CONTAINERS_CONF)}
BASE = "localhost/vqa-debian:bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# the package's sources as both images install them
PACKAGE = ["pyproject.toml", "README.md", "plugins/vqa_operators", "include", "constraints-vllm.txt"]
WHEELS = Path("/opt/wheels")  # torch's CPU wheel, where this kind of machine keeps it (the Makefile's TORCH_SOURCE)
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # this machine's, which trusts its egress proxy


@dataclass(frozen=True)
class Image:
    """One image built here: its name, its Dockerfile, and the files its digest covers."""

    name: str
    dockerfile: str
    inputs: tuple[str, ...]


WORKER = Image("vqa-worker", "docker/worker.Dockerfile", (*PACKAGE,))
VLLM_CPU = Image("vqa-worker-vllm-cpu", "docker/worker-vllm-cpu.Dockerfile", ("constraints-vllm.txt", "requirements-vllm.txt"))
IMAGES = (WORKER, VLLM_CPU)


def podman(*args: str, check: bool = True, capture: bool = True) -> subprocess.CompletedProcess[str]:
    """``podman <args>`` with the project's settings."""
    return subprocess.run(["podman", *args], env={**os.environ, **PODMAN_ENV}, capture_output=capture, text=True, check=check)


def digest(paths: tuple[str, ...], *, also: str = "") -> str:
    """A short SHA-256 of the files under ``paths`` (names and bytes, in order), and ``also``."""
    h = hashlib.sha256(also.encode())
    for rel in paths:
        path = ROOT / rel
        files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts) if path.is_dir() else [path]
        for file in files:
            h.update(str(file.relative_to(ROOT)).encode() + b"\0" + file.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def exists(tag: str) -> bool:
    return podman("image", "exists", tag, check=False).returncode == 0


def tags() -> dict[str, str]:
    """Each image's tag for the sources as they are now: what ``build`` makes, and what the tests run."""
    worker = f"localhost/{WORKER.name}:{digest((WORKER.dockerfile, *WORKER.inputs), also=BASE)}"
    vllm = f"localhost/{VLLM_CPU.name}:{digest((VLLM_CPU.dockerfile, *VLLM_CPU.inputs), also=worker)}"
    return {WORKER.name: worker, VLLM_CPU.name: vllm}


def build_base() -> float:
    """The base image from Debian's packages, if it is not there yet; the seconds it took."""
    if exists(BASE):
        return 0.0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vqa-debootstrap-", dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates",
                "bookworm",
                str(rootfs),
                DEBIAN_MIRROR,
            ],
            check=True,
            capture_output=True,
        )
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(
            ["podman", "import", "-", BASE], stdin=tar.stdout, env={**os.environ, **PODMAN_ENV}, check=True, capture_output=True
        )
        tar.wait()
    return time.monotonic() - started


def build(image: Image, tag: str, build_args: dict[str, str]) -> float:
    """``podman build`` of one image, if its tag is not there yet; the seconds it took."""
    if exists(tag):
        return 0.0
    started = time.monotonic()
    mounts = ["-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"] if Path(CA_BUNDLE).exists() else []
    if any(WHEELS.glob("torch-*")):
        mounts += ["-v", f"{WHEELS}:{WHEELS}:ro"]
        build_args = {**build_args, "TORCH_SOURCE": f"--find-links {WHEELS}"}
    args = [arg for name, value in build_args.items() for arg in ("--build-arg", f"{name}={value}")]
    proc = podman("build", "--layers", *mounts, *args, "-f", str(ROOT / image.dockerfile), "-t", tag, str(ROOT), check=False)
    if proc.returncode != 0:
        sys.exit(f"building {image.name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return time.monotonic() - started


def size(tag: str) -> int:
    return int(json.loads(podman("image", "inspect", tag).stdout)[0]["Size"])


def ensure() -> dict[str, str]:
    """Every image built here, built if it is missing: name -> tag."""
    return {name: tag for name, (tag, _) in build_all().items()}


def build_all() -> dict[str, tuple[str, float]]:
    """Build what is missing, and remove what earlier sources built: name -> (tag, seconds its build took)."""
    if shutil.which("podman") is None:
        sys.exit("podman is not installed (make images installs it)")
    found = tags()
    seconds = build_base()
    done = {"vqa-debian": (BASE, seconds)}
    done[WORKER.name] = (found[WORKER.name], build(WORKER, found[WORKER.name], {"BASE": BASE}))
    done[VLLM_CPU.name] = (found[VLLM_CPU.name], build(VLLM_CPU, found[VLLM_CPU.name], {"WORKER": found[WORKER.name]}))
    prune(set(found.values()))
    return done


def prune(keep: set[str]) -> None:
    """Untag the images earlier sources built (each vLLM one holds gigabytes), then remove the layers nothing uses any more."""
    listed = podman("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
    stale = [tag for tag in listed if tag.split(":")[0] in {f"localhost/{image.name}" for image in IMAGES} and tag not in keep]
    if stale:
        podman("rmi", "--force", *stale, check=False)
    podman("image", "prune", "--force", check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tags", action="store_true", help="print each image's tag for the sources as they are, as JSON, and build nothing"
    )
    if parser.parse_args().tags:
        print(json.dumps(tags()))
        return
    for name, (tag, seconds) in build_all().items():
        print(f"{name:22} {tag:58} {size(tag) / 1e6:8.0f} MB   built in {seconds:5.0f} s")


if __name__ == "__main__":
    main()
