"""service.settings: one place for the session config, the image limits and the CPU-count policy."""

from __future__ import annotations

import os

import pytest

from service import images
from service.runtime import SessionConfig
from service.settings import Settings, SettingsError, available_cpus, cpu_threads, load_settings


def test_session_config_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STN_PROVIDERS", "CPUExecutionProvider")
    monkeypatch.setenv("STN_INTRA_OP_THREADS", "3")
    monkeypatch.setenv("STN_INTER_OP_THREADS", "2")
    monkeypatch.setenv("STN_NATIVE_SAMPLER", "off")
    s = Settings()
    assert s.session_config() == SessionConfig(providers=("CPUExecutionProvider",), intra_op_threads=3,
                                               inter_op_threads=2, native_sampler="off")
    assert s.session_config(["CUDAExecutionProvider"]).providers == ("CUDAExecutionProvider",)


def test_limits_follow_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STN_MAX_UPLOAD_BYTES", "1234")
    monkeypatch.setenv("STN_MAX_IMAGE_PIXELS", "99")
    assert Settings().limits == images.Limits(max_bytes=1234, max_pixels=99)
    assert Settings(max_upload_bytes=5).limits.max_bytes == 5


def test_cpu_policy() -> None:
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert available_cpus() == n
    assert cpu_threads() == max(1, min(8, n)) and cpu_threads(5) == 5
    assert Settings(workers=0).worker_threads == cpu_threads() and Settings(workers=3).worker_threads == 3


def test_bad_settings_name_each_variable_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STN_PORT", "99999")
    monkeypatch.setenv("STN_MAX_UPLOAD_BYTES", "20MB")
    monkeypatch.setenv("STN_API_KEYS", "s3cret")
    with pytest.raises(SettingsError) as e:
        load_settings(workers=-1)
    text = str(e.value)
    assert "\n" not in text and text.startswith("invalid settings: ")
    for part in ("STN_PORT='99999': Input should be less than or equal to 65535",
                 "STN_MAX_UPLOAD_BYTES='20MB': Input should be a valid integer",
                 "STN_WORKERS=-1: Input should be greater than or equal to 0"):
        assert part in text, text
    monkeypatch.delenv("STN_PORT")
    monkeypatch.delenv("STN_MAX_UPLOAD_BYTES")
    monkeypatch.setenv("STN_API_KEYS", "[" + "s3cret" * 5)  # a value that does not parse is not echoed: it is a key
    with pytest.raises(SettingsError) as e:
        load_settings(api_keys=object())
    assert "STN_API_KEYS=(hidden)" in str(e.value) and "s3cret" not in str(e.value)
    assert load_settings(workers=2).worker_threads == 2
