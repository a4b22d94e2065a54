"""Fixtures for the service tests: small models exported into tmp dirs, and a real uvicorn server.

The bundled default model (models/default/*.onnx) is served too; tests that need it skip without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.support import DEFAULT_MODELS, MODEL_SPECS, LiveServer, export_model, live_server


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the three test models (affine gray, projective RGB, TPS RGB)."""
    d = tmp_path_factory.mktemp("models")
    for i, (name, spec) in enumerate(MODEL_SPECS.items()):
        export_model(d / f"{name}.onnx", name, seed=i, **spec)
    return d


@pytest.fixture(scope="session")
def server(model_dir: Path) -> Iterator[LiveServer]:
    """The service on the test models, default settings but CPU only and a short batching delay."""
    with live_server(model_dir=model_dir, max_queue_delay_ms=5, workers=4) as s:
        yield s


@pytest.fixture(scope="session")
def default_server() -> Iterator[LiveServer]:
    """The service on the bundled default model, with default settings (skips until the model exists)."""
    if not DEFAULT_MODELS:
        pytest.skip("models/default/*.onnx is not bundled yet")
    with live_server() as s:
        yield s
