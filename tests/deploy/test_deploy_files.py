"""Dockerfile, docker-compose.yml and the deploy docs say the same thing, and do what the docs promise.

docker-compose.yml is read by a real compose implementation (podman-compose: ``config --dry-run``
needs no engine), with its variable interpolation, YAML merge keys and profiles; those tests skip
where podman-compose is not installed (``.ci/docker-smoke`` installs it and runs this file).
The image itself is built and run by ``.ci/docker-smoke``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from service.settings import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
# The README has the deploy section.
DEPLOY_DOC = ROOT / "README.md"
SETTINGS = {f"STN_{name.upper()}" for name in Settings.model_fields}
# What a container changes on purpose: where the models are and where it listens.
CONTAINER_DEFAULTS = {"STN_MODEL_DIR": "/models", "STN_HOST": "0.0.0.0", "STN_PORT": "8000"}
PROFILES = ["cpu", "batch", "batch-cpu"]


def compose_config(env: dict[str, str] | None = None, profiles: list[str] = PROFILES) -> dict:
    """``podman-compose config`` of docker-compose.yml, parsed: what compose itself makes of the file."""
    pytest.importorskip("podman_compose")
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("STN_") and k not in ("HOST_PORT", "MODELS", "BATCH_INPUT", "BATCH_OUTPUT",
                                                       "BATCH_USER", "COMPOSE_PROFILES", "COMPOSE_FILE")}
    clean.update(env or {})
    args = [sys.executable, "-m", "podman_compose", "--dry-run", "-f", str(COMPOSE)]
    for p in profiles:
        args += ["--profile", p]
    out = subprocess.run([*args, "config"], cwd=ROOT, env=clean, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"podman-compose config failed:\n{out.stderr}"
    return yaml.safe_load(out.stdout)


@pytest.fixture(scope="module")
def config() -> dict:
    return compose_config()


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: str(v) for k, v in env.items()}


def gpu_devices(service: dict) -> list[dict]:
    return (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []


def build_args(service: dict) -> dict[str, str]:
    args = (service.get("build") or {}).get("args") or {}
    if isinstance(args, list):
        args = dict(a.split("=", 1) for a in args)
    return args


def volume_targets(service: dict) -> dict[str, str]:
    """target -> source of each volume (short syntax ``SOURCE:TARGET[:MODE]`` or long syntax)."""
    out = {}
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            out[v["target"]] = v.get("source", "")
        else:
            source, target = v.split(":")[:2]
            out[target] = source
    return out


def test_services_and_profiles(config: dict) -> None:
    services = config["services"]
    assert set(services) == {"stn", "stn-cpu", "batch", "batch-cpu"}
    assert not services["stn"].get("profiles"), "`docker compose up` on a GPU host starts stn"
    assert services["stn-cpu"]["profiles"] == ["cpu"]
    assert services["batch"]["profiles"] == ["batch"]
    assert services["batch-cpu"]["profiles"] == ["batch-cpu"]
    assert set(compose_config(profiles=[])["services"]) == {"stn"}


@pytest.mark.parametrize("name", ["stn", "batch"])
def test_gpu_services_reserve_an_nvidia_gpu(config: dict, name: str) -> None:
    service = config["services"][name]
    devices = gpu_devices(service)
    assert len(devices) == 1, devices
    assert devices[0]["driver"] == "nvidia"
    assert "gpu" in devices[0]["capabilities"]
    assert str(devices[0].get("count", "")) in ("1", "all") or devices[0].get("device_ids")
    assert build_args(service)["VARIANT"] == "gpu"


@pytest.mark.parametrize("name", ["stn-cpu", "batch-cpu"])
def test_cpu_services_reserve_no_gpu_and_use_the_cpu_image(config: dict, name: str) -> None:
    service = config["services"][name]
    assert gpu_devices(service) == []
    assert build_args(service)["VARIANT"] == "cpu"
    assert env_of(service)["STN_PROVIDERS"] == "CPUExecutionProvider"
    assert service["image"] != config["services"]["stn"]["image"]


@pytest.mark.parametrize("name", ["stn", "stn-cpu"])
def test_servers_port_volume_healthcheck_restart(config: dict, name: str) -> None:
    service = config["services"][name]
    ports = [str(p) for p in service["ports"]]
    assert ports == ["8000:8000"], ports
    assert volume_targets(service) == {"/models": "stn-models"}
    assert "stn-models" in config["volumes"]
    hc = service["healthcheck"]
    assert hc["test"][0] == "CMD" and any("/readyz" in part for part in hc["test"]), hc["test"]
    assert hc["interval"] and hc["timeout"] and hc["retries"] >= 1
    assert service["restart"] == "unless-stopped"
    assert "command" not in service  # the image's CMD: stn serve


@pytest.mark.parametrize("name", ["stn", "stn-cpu"])
def test_servers_get_the_time_their_drain_needs(config: dict, name: str) -> None:
    """SIGTERM drains for up to STN_SHUTDOWN_GRACE_S (default: request timeout + 5 s); compose waits longer."""
    grace = config["services"][name]["stop_grace_period"]
    seconds = int(re.fullmatch(r"(\d+)s", str(grace)).group(1))
    assert seconds > Settings().grace_s, (grace, Settings().grace_s)
    assert re.search(r"^STOPSIGNAL SIGTERM$", dockerfile(), re.M)


@pytest.mark.parametrize("name", ["batch", "batch-cpu"])
def test_batch_jobs_run_stn_batch_over_mounted_folders(config: dict, name: str) -> None:
    service = config["services"][name]
    assert service["command"] == ["batch", "/data/input", "/data/output"]
    mounts = {v.split(":")[1]: v for v in service["volumes"]}
    assert set(mounts) == {"/models", "/data/input", "/data/output"}
    assert mounts["/data/input"].endswith(":ro")
    assert service["restart"] == "no"


@pytest.mark.parametrize("name", ["stn", "stn-cpu", "batch", "batch-cpu"])
def test_every_setting_by_environment_with_the_services_defaults(config: dict, name: str) -> None:
    env = env_of(config["services"][name])
    stn_vars = {k for k in env if k.startswith("STN_")}
    assert stn_vars == SETTINGS, f"missing {SETTINGS - stn_vars}, unknown {stn_vars - SETTINGS}"
    for key, value in CONTAINER_DEFAULTS.items():
        assert env[key] == value, (key, env[key])
    # compose's defaults, parsed as the service parses them, are the service's own defaults
    given = {k[4:].lower(): v for k, v in env.items() if k not in CONTAINER_DEFAULTS and k != "STN_PROVIDERS"}
    parsed, defaults = Settings(**given), Settings()
    for field in given:
        assert getattr(parsed, field) == getattr(defaults, field), (field, env[f"STN_{field.upper()}"])


def test_settings_and_paths_come_from_the_environment() -> None:
    config = compose_config({"STN_MAX_BATCH_SIZE": "64", "STN_API_KEYS": "a,b", "STN_PROVIDERS": "CPUExecutionProvider",
                             "HOST_PORT": "9000", "MODELS": "./my-models", "BATCH_INPUT": "/srv/scans",
                             "BATCH_OUTPUT": "/srv/rectified", "BATCH_USER": "1000:1000"})
    stn = config["services"]["stn"]
    env = env_of(stn)
    assert env["STN_MAX_BATCH_SIZE"] == "64" and env["STN_API_KEYS"] == "a,b"
    assert env["STN_PROVIDERS"] == "CPUExecutionProvider"
    assert [str(p) for p in stn["ports"]] == ["9000:8000"]
    assert volume_targets(stn)["/models"].endswith("my-models")
    batch = config["services"]["batch"]
    assert batch["user"] == "1000:1000"
    assert volume_targets(batch)["/data/input"] == "/srv/scans"
    assert volume_targets(batch)["/data/output"] == "/srv/rectified"


# ---------------------------------------------------------------- Dockerfile


def dockerfile() -> str:
    return DOCKERFILE.read_text()


def test_dockerfile_multi_stage_build_args_user_port_healthcheck() -> None:
    text = dockerfile()
    froms = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M | re.I)
    assert [f[0] for f in froms] == ["${BASE_IMAGE}", "${BASE_IMAGE}"] and froms[0][1] == "builder", froms
    assert re.search(r"^ARG BASE_IMAGE=\S+", text, re.M)
    assert re.search(r"^ARG VARIANT=gpu$", text, re.M)
    assert "onnxruntime-gpu[cuda,cudnn]" in text and "onnxruntime==" in text
    assert re.search(r"^USER 10001", text, re.M)
    assert re.search(r"^EXPOSE 8000$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*?/readyz", text, re.M)
    # dependencies are installed before the code is copied
    assert text.index("COPY pyproject.toml") < text.index("-r requirements.txt") < text.index("COPY . .")
    assert "pip install -q --no-deps --no-index /tmp/wheels/" in text  # the code, without re-resolving dependencies
    assert not re.search(r"pip install[^\n]*(torch|train)", text), "no torch in the runtime image"


def test_every_setting_is_named_in_the_dockerfile_and_the_deploy_doc() -> None:
    text, doc = dockerfile(), DEPLOY_DOC.read_text()
    named = set(re.findall(r"\bSTN_[A-Z_]+\b", text))
    assert SETTINGS <= named, f"not in the Dockerfile: {SETTINGS - named}"
    assert named <= SETTINGS, f"not settings: {named - SETTINGS}"
    table = set(re.findall(r"^\| `(STN_[A-Z_]+)` \|", doc, re.M))
    assert table == SETTINGS, f"{DEPLOY_DOC.name} settings table: missing {SETTINGS - table}, unknown {table - SETTINGS}"


def test_deploy_doc_describes_the_compose_file() -> None:
    doc = DEPLOY_DOC.read_text()
    for phrase in ("docker compose up -d", "docker compose up -d stn-cpu", "docker compose run --rm batch",
                   "NVIDIA Container Toolkit", "/models", "driver: nvidia", "--build-arg VARIANT=cpu",
                   ".ci/docker-smoke"):
        assert phrase in doc, phrase
