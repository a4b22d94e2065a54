"""stn doctor and stn doctor --gpu: the report, exit codes, the record, and the GPU checks rehearsed on the CPU provider."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import native
from service import doctor
from service import doctor_gpu as G
from service.runtime import model_files

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DIR = ROOT / "models" / "default"


def _stn(*args: str, code_prefix: str = "", timeout: float = 300) -> subprocess.CompletedProcess:
    code = f"{code_prefix}import sys; from stn.cli import main; sys.exit(main({list(args)!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def _gpu_here() -> bool:
    return bool(doctor.gpus()["devices"])


def test_doctor_json_report() -> None:
    proc = _stn("doctor", "--json", "--model-dir", str(DEFAULT_DIR))
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)  # stdout is the JSON alone (onnxruntime's printed EP banners kept out of it)
    assert r["versions"]["onnxruntime"] and r["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    names = {p["name"]: p for p in r["providers"]}
    assert names["CPUExecutionProvider"]["usable"] is True
    for p in r["providers"]:
        assert p["usable"] or p["reason"], p  # a provider that is not usable says why
    if "CUDAExecutionProvider" in names and not names["CUDAExecutionProvider"]["usable"] and not _gpu_here():
        assert "libonnxruntime_providers_cuda.so" in names["CUDAExecutionProvider"]["reason"] or \
            "session on it fails" in names["CUDAExecutionProvider"]["reason"]
    assert set(r["gpus"]) == {"source", "devices", "reason"}
    assert set(r["native_sampler"]) >= {"available", "path", "reason", "cuda"}
    assert r["models"]["model_dir"] == str(DEFAULT_DIR)
    assert [m["name"] for m in r["models"]["models"]] == [p.stem for p in model_files(DEFAULT_DIR)]
    assert all(m["ok"] and "CPUExecutionProvider" in m["providers"] for m in r["models"]["models"])


def test_doctor_text_names_a_broken_model_and_exits_1(tmp_path: Path) -> None:
    (tmp_path / "good.onnx").write_bytes((DEFAULT_DIR / model_files(DEFAULT_DIR)[0].name).read_bytes())
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    proc = _stn("doctor", "--model-dir", str(tmp_path))
    assert proc.returncode == 1, proc.stderr
    assert "execution providers:" in proc.stdout and "CPUExecutionProvider" in proc.stdout
    assert "broken" in proc.stdout and "FAILS: broken.onnx: not a readable ONNX file" in proc.stdout
    assert "good " in proc.stdout and "ok (" in proc.stdout


def test_doctor_works_without_torch() -> None:
    """A serving-only install has no torch: the report says so and still lists the rest."""
    proc = _stn("doctor", "--json", code_prefix="import sys; sys.modules['torch'] = None; ")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["versions"]["torch"] is None and r["models"]["models"]


@pytest.mark.skipif(_gpu_here(), reason="this machine has a GPU: doctor --gpu runs the checks instead")
def test_doctor_gpu_exits_2_without_a_gpu_and_writes_the_record(tmp_path: Path) -> None:
    out = tmp_path / "record.json"
    proc = _stn("doctor", "--gpu", "--out", str(out))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no GPU found" in proc.stderr
    record = json.loads(out.read_text())
    assert record["schema"] == G.SCHEMA and record["exit_code"] == 2 and record["ok"] is False
    assert record["no_gpu"].startswith("no GPU found") and record["checks"] == []
    assert record["report"]["versions"]["onnxruntime"]


def test_unknown_check_is_refused() -> None:
    proc = _stn("doctor", "--gpu", "--provider", "CPUExecutionProvider", "--checks", "parity,warp")
    assert proc.returncode == 2 and "unknown check(s) warp" in proc.stderr


MIXED_LOG = """\
2026-11-28 03:58:23.693751080 [V:onnxruntime:, session_state.cc:1578 VerifyEachNodeIsAssignedToAnEp] Node placements
2026-11-28 03:58:23.693758824 [V:onnxruntime:, session_state.cc:1581 VerifyEachNodeIsAssignedToAnEp]  Node(s) placed on [CUDAExecutionProvider]. Number of nodes: 2
  MatMul (/MatMul)
  GridSample (/sampler/GridSample)
2026-11-28 03:58:23.693758824 [V:onnxruntime:, session_state.cc:1581 VerifyEachNodeIsAssignedToAnEp]  Node(s) placed on [CPUExecutionProvider]. Number of nodes: 1
  Shape (/Shape_1)
2026-11-28 03:58:23.693794320 [I:onnxruntime:, allocation_planner.cc:2719 CreateGraphPartitioner] Use DeviceBasedPartition
"""


def test_parse_placements_names_the_nodes() -> None:
    assert G.parse_placements(MIXED_LOG) == {"CUDAExecutionProvider": ["MatMul (/MatMul)",
                                                                       "GridSample (/sampler/GridSample)"],
                                             "CPUExecutionProvider": ["Shape (/Shape_1)"]}
    one = "2026-11-28 03:58:23.6 [V:onnxruntime:, x] All nodes placed on [CPUExecutionProvider]. Number of nodes: 4\n"
    assert G.parse_placements(one) == {"CPUExecutionProvider": ["*"] * 4}


@pytest.fixture(scope="module")
def cpu_context(tmp_path_factory: pytest.TempPathFactory) -> G.GpuContext:
    # the bundled models only: exporting the 224x224 bench model takes a while (the slow full run below has it)
    return G.GpuContext(DEFAULT_DIR, tmp_path_factory.mktemp("doctor"), "CPUExecutionProvider", quick=True,
                        bench_model=False)


@pytest.mark.parametrize("check", ["node_placement", "parity", "sampler_parity"])
def test_gpu_checks_rehearsed_on_the_cpu_provider(cpu_context: G.GpuContext, check: str) -> None:
    entry = G.run_check(check, G.CHECKS[check], cpu_context)
    assert entry["status"] == "pass", entry["reason"]
    names = {name for name, _ in cpu_context.model_files()}
    assert names == {p.stem for p in model_files(DEFAULT_DIR)}
    native_here = native.available()  # built wherever the test command ran (it fetches the headers first)
    if check == "node_placement":
        details = dict(entry["details"])
        assert ("native" in details) != native_here  # a reason only when it is not checked
        details.pop("native", None)
        for sub, found in details.items():
            assert found["session"] == "ok" and found["elsewhere"] == [], sub
            assert found["placements"]["CPUExecutionProvider"] >= 1
        parts = {sub.split("/")[1] for sub in details}
        assert parts == {"resize", "localiser", "sampler"} | ({"sampler-native"} if native_here else set())
        assert len(details) == len(parts) * len(names)
    if check == "parity":
        for d in entry["details"].values():
            assert d.pop("sampler") == ("native" if native_here else "exported")
            assert all(v <= G.PARITY_ATOL for v in d.values())
    if check == "sampler_parity":
        labels = set(entry["details"]) - {"native"}
        assert {"onnx/bilinear/zeros", "contrib/nearest/border"} <= labels
        natives = {k for k in labels if k.startswith("native")}
        assert len(natives) == (3 * 4 if native_here else 0)  # GridSample and Warp (affine, projective) x 4 modes
        assert all(entry["details"][k]["max_abs"] <= G.PARITY_ATOL for k in labels if "bilinear" in k)


def test_the_native_sampler_is_checked_against_torch_and_named_when_wrong(
        cpu_context: G.GpuContext, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sampler check fails, naming the op, when the native library samples something else."""
    if not native.available():
        pytest.skip(f"native sampler not built here: {native.status()['reason']}")
    real = native.op_model

    def off_by_a_pixel(op: str = native.GRID_SAMPLE, mode: str = "bilinear", padding: str = "zeros",
                       align_corners: bool = False, domain: str = native.DOMAIN, opset: int = 18) -> bytes:
        # the native contenders get a model whose sampler reads a shifted grid (or image): what a wrong kernel would do
        if domain != native.DOMAIN:
            return real(op, mode, padding, align_corners, domain, opset)
        from onnx import TensorProto, helper, load_from_string

        model = load_from_string(real(op, mode, padding, align_corners, domain, opset))
        first = "G" if op == native.GRID_SAMPLE else "X"
        for node in model.graph.node:
            node.input[list(node.input).index(first)] = first + "_shifted"
        model.graph.initializer.append(helper.make_tensor("shift", TensorProto.FLOAT, [1], [0.05]))
        model.graph.node.insert(0, helper.make_node("Add", [first, "shift"], [first + "_shifted"]))
        return model.SerializeToString()

    monkeypatch.setattr(native, "op_model", off_by_a_pixel)
    entry = G.run_check("sampler_parity", G.CHECKS["sampler_parity"], cpu_context)
    assert entry["status"] == "fail"
    assert "native/bilinear/zeros vs torch" in entry["reason"] and "onnx/" not in entry["reason"]


def test_node_placement_reports_a_session_it_cannot_create() -> None:
    from onnx import TensorProto, helper

    node = helper.make_node("NoSuchOp", ["x"], ["y"], domain="stn.nowhere")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("stn.nowhere", 1)],
                              ir_version=8)
    found = G.node_placement(model.SerializeToString(), "CPUExecutionProvider")
    assert found["session"] != "ok" and "NoSuchOp" in found["session"]


def test_failing_and_skipped_checks_are_recorded_not_raised(cpu_context: G.GpuContext) -> None:
    def skip(ctx: G.GpuContext) -> dict:
        raise G.Skip("needs a thing this machine lacks")

    def broken(ctx: G.GpuContext) -> dict:
        raise KeyError("oops")

    assert G.run_check("s", skip, cpu_context)["status"] == "skip"
    entry = G.run_check("b", broken, cpu_context)
    assert entry["status"] == "fail" and entry["reason"] == "KeyError: 'oops'"


@pytest.mark.slow
def test_full_gpu_check_run_rehearsed_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "record.json"
    proc = _stn("doctor", "--gpu", "--provider", "CPUExecutionProvider", "--quick", "--out", str(out), timeout=600)
    record = json.loads(out.read_text())
    assert proc.returncode == record["exit_code"] == 0, [(c["name"], c["reason"]) for c in record["checks"]]
    assert [c["name"] for c in record["checks"]] == list(G.CHECKS)
    assert all(c["status"] == "pass" for c in record["checks"])
    placed = next(c for c in record["checks"] if c["name"] == "node_placement")["details"]
    assert {"affine224/resize", "affine224/localiser", "affine224/sampler"} <= set(placed)
    for c in record["checks"]:
        assert set(c) == {"name", "status", "reason", "details", "seconds"}
    rows = next(c for c in record["checks"] if c["name"] == "throughput")["details"]["rows"]
    contenders = {r["contender"] for r in rows if r["model"] == "affine224" and r["batch"] == 4}
    assert contenders == {"torch-eager", "ort-plain", "ort-iobinding"} | (
        {"ort-native-plain", "ort-native-iobinding"} if native.available() else set())
    assert all(r["images_per_s"] > 0 for r in rows)
    serve = next(c for c in record["checks"] if c["name"] == "serve")["details"]
    assert serve["memory"]["before"] > 0 and "throughput_service_vs_bare" in serve["bench_serve"]
    train = next(c for c in record["checks"] if c["name"] == "train")["details"]
    assert train["device"] == "cpu" and train["steps"] == 8 and train["steps_per_second"] > 0
    document = next(c for c in record["checks"] if c["name"] == "train_document")["details"]
    assert document["device"] == "cpu" and document["steps"] == 8 and document["steps_per_second"] > 0
    assert "--distortion document" in document["command"] and 0 <= document["data_wait_fraction"] <= 1
    assert {g["goal"] for g in record["goals"]} >= {"service at saturation vs bare onnxruntime"}
