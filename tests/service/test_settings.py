"""service.settings: one place for the session config, the image limits and the CPU-count policy."""

from __future__ import annotations

import os

import pytest

from service import images
from service.runtime import SessionConfig
from service.settings import Settings, available_cpus, cpu_threads


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
