"""`stn serve` end to end: a subprocess with torch blocked, settings from env and flags."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.service.support import free_port

ROOT = Path(__file__).resolve().parents[3]


def test_settings_from_env_and_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from service.api.cli import serve_settings
    from stn.cli import build_parser

    monkeypatch.setenv("STN_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("STN_PROVIDERS", "CPUExecutionProvider")
    monkeypatch.setenv("STN_API_KEYS", "a, b")
    monkeypatch.setenv("STN_CORS_ORIGINS", "https://x.example")
    args = build_parser().parse_args(["serve", "--model-dir", str(tmp_path), "--port", "9999"])
    s = serve_settings(args)
    assert (s.max_batch_size, s.port, s.model_dir) == (7, 9999, tmp_path)
    assert s.providers == ["CPUExecutionProvider"] and s.api_keys == ["a", "b"]
    assert s.cors_origins == ["https://x.example"]
    assert "a" not in repr(s).split("api_keys")[-1][:10]  # keys stay out of logs


@pytest.mark.parametrize("flags, env, says", [
    (["--port", "99999"], {}, "STN_PORT=99999: Input should be less than or equal to 65535"),
    ([], {"STN_WORKERS": "-1"}, "STN_WORKERS='-1': Input should be greater than or equal to 0"),
    ([], {"STN_IMAGE_FORMATS": "gif"}, "STN_IMAGE_FORMATS='gif'"),
])
def test_bad_settings_are_one_line_and_exit_2(flags: list[str], env: dict, says: str) -> None:
    # before: pydantic's traceback and exit status 1, from a flag or an STN_* variable alike
    proc = subprocess.run([sys.executable, "-m", "stn", "serve", *flags], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("stn serve: invalid settings: ") and says in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr


def test_default_model_dir_is_next_to_the_models_package() -> None:
    from service.settings import Settings

    assert Settings().model_dir == ROOT / "models" / "default"


@pytest.mark.slow
def test_stn_serve_subprocess_without_torch(model_dir: Path) -> None:
    port = free_port()
    code = ("import sys; sys.modules['torch'] = None\n"
            "from stn.cli import main\n"
            f"sys.exit(main(['serve', '--port', '{port}', '--log-level', 'warning']))\n")
    env = {**os.environ, "STN_MODEL_DIR": str(model_dir), "STN_PROVIDERS": "CUDAExecutionProvider,CPUExecutionProvider"}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                pass
            if ready:
                break
            time.sleep(0.1)
        assert ready, proc.stdout.read() if proc.poll() is not None else "not ready in 60s"
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["models"]
        assert all(m["providers"][-1] == "CPUExecutionProvider" for m in models)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    # CUDA unavailable here: exactly one warning from us, none of onnxruntime's provider errors
    if "CUDAExecutionProvider" not in str(models[0]["providers"]):
        assert out.count("CUDAExecutionProvider is not usable") == 1, out
        assert "Failed to load library" not in out, out


def test_every_setting_is_documented() -> None:
    from service.settings import Settings

    doc = (ROOT / "README.md").read_text()
    missing = [f"STN_{name.upper()}" for name in Settings.model_fields if f"`STN_{name.upper()}`" not in doc]
    assert not missing, f"README.md lacks {missing}"
