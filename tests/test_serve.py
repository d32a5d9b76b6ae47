"""serve: a real Triton server (the tritonserver binary nvidia-pytriton bundles) answers exactly as in-process
onnxruntime and `scarlet predict`, refuses malformed requests and keeps serving, and stops leaving nothing behind.

One `scarlet serve` process per module, on free loopback ports; the last test stops it.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from scarlet_deploy.export.registry import get_spec
from scarlet_deploy.export.trt_build import BatchProfile, EngineConfig, build_engine
from scarlet_deploy.runtime.cli import main
from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.data.preprocess import deploy
from scarlet_deploy.runtime.predict import predict
from scarlet_deploy.runtime.runners.ort import OrtRunner
from scarlet_deploy.runtime.runners.trt import TrtRunner, require_gpu
from scarlet_deploy.runtime.serve.repository import Batching, ServeRequest, write_serving_repository
from scarlet_deploy.runtime.serve.server import TritonDist, TritonServer, check_ports_free, free_ports, launcher_paths

tritonclient = pytest.importorskip("tritonclient", reason="the serve extra is not installed (make setup installs it)")
import tritonclient.grpc as tgrpc  # noqa: E402
import tritonclient.http as thttp  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

try:
    TritonDist.find()
except ScarletError as e:  # pragma: no cover - depends on the environment
    pytest.skip(f"no Triton server binary: {e}", allow_module_level=True)

pytestmark = pytest.mark.slow
NAME = "lite0"


def _group_of(parent: int) -> list[int]:
    """PIDs of the children of `parent` and of their process groups (tritonserver and its stubs)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            f = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pids.append((int(stat.parent.name), int(f[1]), int(f[2])))
    groups = {pid for pid, ppid, _ in pids if ppid == parent}
    return sorted({pid for pid, ppid, pgid in pids if ppid == parent or pgid in groups})


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def server(lite0_onnx, tmp_path_factory, start_scarlet_serve):
    proc, ports = start_scarlet_serve(["--onnx", str(lite0_onnx), "--model", NAME],
                                      tmp_path_factory.mktemp("serve") / "triton.log")
    yield proc, ports
    stop_scarlet_serve(proc)


def stop_scarlet_serve(proc) -> None:
    """SIGTERM, as a user's Ctrl-C: scarlet serve stops Triton and its stubs. Only if it hangs, SIGKILL it and
    everything it started, found before the kill (a killed parent's children are re-parented at once)."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        group = _group_of(proc.pid)
        proc.kill()
        for pid in group:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def images(val_files) -> list[Path]:
    return val_files[3::60][:8]


def _client(m, ports):
    # One client per thread: tritonclient's clients are not thread-safe. Timeouts keep a stuck server from
    # hanging the suite.
    if m is thttp:
        return thttp.InferenceServerClient(f"127.0.0.1:{ports.http}", connection_timeout=30, network_timeout=60)
    return tgrpc.InferenceServerClient(f"127.0.0.1:{ports.grpc}")


def _clients(ports):
    return [(m, _client(m, ports)) for m in (thttp, tgrpc)]


def _infer(m, client, model, name, arr, dtype, outputs=None):
    i = m.InferInput(name, list(arr.shape), dtype)
    i.set_data_from_numpy(arr)
    kwargs = {"client_timeout": 60} if m is tgrpc else {}
    return client.infer(model, [i], outputs=outputs, **kwargs)


def test_served_logits_equal_inprocess_onnxruntime(server, lite0_onnx, images):
    _, ports = server
    pre = get_spec("efficientnet_lite0").preprocess
    x = np.stack([deploy(f, pre) for f in images])
    ref = OrtRunner(lite0_onnx).infer(x)
    assert len(set(ref.argmax(1))) > 1, "parity needs images whose top-1 differs"
    for m, client in _clients(ports):
        whole = _infer(m, client, NAME, "input", x, "FP32").as_numpy("logits")
        # single-image requests sent together, so Triton's dynamic batcher merges them
        with ThreadPoolExecutor(len(x)) as pool:
            singles = np.concatenate(list(pool.map(
                lambda row, m=m: _infer(m, _client(m, ports), NAME, "input", row[None], "FP32").as_numpy("logits"), x)))
        for y in (whole, singles):
            assert y.shape == ref.shape and y.dtype == np.float32
            assert np.abs(y - ref).max() / np.abs(ref).max() <= 1e-6, m.__name__


def test_image_model_top1_and_top5_equal_predict(server, lite0_onnx, images):
    _, ports = server
    preds, skipped = predict(lite0_onnx, [str(f) for f in images])
    assert not skipped
    for m, client in _clients(ports):
        for f, p in zip(images, preds):
            r = _infer(m, client, f"{NAME}_image", "image", np.fromfile(f, np.uint8)[None], "UINT8",
                       outputs=[m.InferRequestedOutput("probabilities", class_count=5), m.InferRequestedOutput("logits")])
            top5 = [s.decode().split(":", 2) for s in r.as_numpy("probabilities")[0]]
            assert [(int(i), name) for _, i, name in top5] == [(i, name) for i, name, _ in p.top], (m.__name__, f)
            assert np.allclose([float(v) for v, _, _ in top5], [prob for _, _, prob in p.top], atol=1e-5)
            assert int(r.as_numpy("logits")[0].argmax()) == p.top[0][0]


def test_dynamic_batching_merges_concurrent_requests(server, images):
    _, ports = server
    client = thttp.InferenceServerClient(f"127.0.0.1:{ports.http}", concurrency=16, network_timeout=60)
    x = deploy(images[0], get_spec("efficientnet_lite0").preprocess)[None]
    before = client.get_inference_statistics(NAME)["model_stats"][0]
    inp = thttp.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    for r in [client.async_infer(NAME, [inp]) for _ in range(32)]:
        r.get_result()
    deadline = time.monotonic() + 10
    while True:  # Triton updates its statistics just after the responses leave
        after = client.get_inference_statistics(NAME)["model_stats"][0]
        inferences = after["inference_count"] - before["inference_count"]
        if inferences >= 32 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == 32 and executions < inferences


@pytest.mark.parametrize("what", ["shape", "dtype", "batch", "undecodable", "empty", "bytes_type"])
def test_malformed_requests_are_refused_and_the_server_keeps_serving(server, images, what):
    _, ports = server
    cases = {
        "shape": (NAME, "input", np.zeros((1, 3, 200, 224), np.float32), "FP32"),
        "dtype": (NAME, "input", np.zeros((1, 3, 224, 224), np.float64), "FP64"),
        "batch": (NAME, "input", np.zeros((9, 3, 224, 224), np.float32), "FP32"),  # served with --max-batch 8
        "undecodable": (f"{NAME}_image", "image", np.frombuffer(b"GIF89a but not really", np.uint8)[None].copy(), "UINT8"),
        "empty": (f"{NAME}_image", "image", np.zeros((1, 0), np.uint8), "UINT8"),
        "bytes_type": (f"{NAME}_image", "image", np.array([[b"\xff\xd8 jpeg"]], dtype=np.object_), "BYTES"),
    }
    model, name, arr, dtype = cases[what]
    good = np.fromfile(images[0], np.uint8)[None]
    for m, client in _clients(ports):
        with pytest.raises(InferenceServerException):
            _infer(m, client, model, name, arr, dtype)
        assert client.is_server_ready() and client.is_model_ready(NAME) and client.is_model_ready(f"{NAME}_image")
        assert _infer(m, client, f"{NAME}_image", "image", good, "UINT8").as_numpy("logits").shape == (1, 1000)


def _raw_http(port: int, body: bytes, headers: dict[str, str], path: str = f"/v2/models/{NAME}/infer") -> int:
    """POST exactly these bytes and headers (no client-side checks); the HTTP status, or 0 if the connection dropped."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.putrequest("POST", path)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        conn.send(body)
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return 0
    finally:
        conn.close()


def _json_infer(model: str, name: str, shape, dtype: str, data, **params) -> bytes:
    inp = {"name": name, "shape": shape, "datatype": dtype, "data": data}
    if params:
        inp["parameters"] = params
        del inp["data"]
    return json.dumps({"inputs": [inp]}).encode()


def _hostile_http() -> dict[str, tuple[bytes, dict[str, str]]]:
    import gzip

    js = {"Content-Type": "application/json"}
    deep = b'{"inputs":[{"name":"input","shape":[1],"datatype":"FP32","data":' + b"[" * 200000 + b"]" * 200000 + b"}]}"
    header = _json_infer(NAME, "input", [1, 3, 224, 224], "FP32", None, binary_data_size=1 << 40)
    return {
        # Triton 2.51 alone allocates the declared 600 GB while parsing this and aborts (std::bad_alloc).
        "json_huge_shape": (_json_infer(NAME, "input", [1000000, 3, 224, 224], "FP32", [1]), js),
        "json_huge_image": (_json_infer(f"{NAME}_image", "image", [1, 1 << 40], "UINT8", [255]), js),
        "json_shape_overflow": (_json_infer(NAME, "input", [1 << 70, 3, 224, 224], "FP32", [1]), js),
        "json_negative_shape": (_json_infer(NAME, "input", [-1, 3, 224, 224], "FP32", [1]), js),
        "json_deeply_nested": (deep, js),
        "not_json": (b"{\"inputs\": [", js),
        "binary_size_beyond_body": (header + b"\0" * 16, {"Inference-Header-Content-Length": str(len(header))}),
        "header_length_beyond_body": (b"{}", {"Inference-Header-Content-Length": str(1 << 40)}),
        "content_length_1tb": (b"", {"Content-Length": str(1 << 40)}),
        "chunked": (b"5\r\nhello\r\n0\r\n\r\n", {"Transfer-Encoding": "chunked"}),
        "gzip_bomb": (gzip.compress(b" " * (200 << 20), 9), {**js, "Content-Encoding": "gzip"}),
        "gzip_garbage": (b"not gzip at all", {**js, "Content-Encoding": "gzip"}),
    }


def test_a_burst_of_hostile_requests_leaves_the_server_ready(server, images):
    """HTTP requests that declare more than they carry, oversized bodies, bombs; gRPC's equivalents."""
    _, ports = server
    sent = _hostile_http()
    for what, (body, headers) in sent.items():
        headers = {"Content-Length": str(len(body)), **headers}
        status = _raw_http(ports.http, body, headers)
        assert status in (0, 400, 411, 413), (what, status)
        with urllib.request.urlopen(f"http://127.0.0.1:{ports.http}/v2/health/ready", timeout=10) as r:
            assert r.status == 200, what
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{ports.grpc}")
    for model, name, shape, dtype in [(NAME, "input", [1000000, 3, 224, 224], "FP32"), (f"{NAME}_image", "image", [1, 1 << 40], "UINT8")]:
        i = tgrpc.InferInput(name, shape, dtype)
        i._raw_content = b"\0\0\0\0"  # fewer bytes than declared, as a hostile client sends them
        with pytest.raises(InferenceServerException):
            client.infer(model, [i], client_timeout=60)
    good = np.fromfile(images[0], np.uint8)[None]
    for m, c in _clients(ports):
        assert c.is_server_ready() and c.is_model_ready(NAME) and c.is_model_ready(f"{NAME}_image")
        assert _infer(m, c, f"{NAME}_image", "image", good, "UINT8").as_numpy("logits").shape == (1, 1000)
    # JSON tensor data within the limits still goes through the guard.
    x = np.zeros((1, 3, 224, 224), np.float32)
    i = thttp.InferInput("input", list(x.shape), "FP32")
    i.set_data_from_numpy(x, binary_data=False)
    assert thttp.InferenceServerClient(f"127.0.0.1:{ports.http}").infer(NAME, [i]).as_numpy("logits").shape == (1, 1000)


def test_clashing_ports_are_refused_naming_the_clash(lite0_onnx, capsys):
    assert main(["serve", "--onnx", str(lite0_onnx), "--http-port", "18000", "--grpc-port", "18000"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "the HTTP and gRPC ports are both 18000" in err and "Traceback" not in err
    assert main(["serve", "--onnx", str(lite0_onnx), "--grpc-port", "18001", "--metrics-port", "18001"]) == 2
    assert "the gRPC and metrics ports are both 18001" in " ".join(capsys.readouterr().err.split())


def test_a_bad_image_fails_alone_in_its_dynamic_batch(server, images):
    _, ports = server
    client = thttp.InferenceServerClient(f"127.0.0.1:{ports.http}", concurrency=8, network_timeout=60)
    bodies = [np.fromfile(f, np.uint8)[None] for f in images[:3]] + [np.frombuffer(b"\xff\xd8 truncated", np.uint8)[None]]
    bodies = bodies * 2  # sent together, so Triton's batcher puts good and bad rows in one execute call
    pending = []
    for b in bodies:
        inp = thttp.InferInput("image", list(b.shape), "UINT8")
        inp.set_data_from_numpy(b)
        pending.append(client.async_infer(f"{NAME}_image", [inp]))
    ok, refused = 0, 0
    for b, p in zip(bodies, pending):
        try:
            assert p.get_result().as_numpy("logits").shape == (1, 1000)
            ok += 1
        except InferenceServerException as e:
            assert "image: not a" in str(e)  # the shared image loader: the input, then why it is no image
            refused += 1
    assert (ok, refused) == (6, 2)


def test_port_in_use_is_a_one_paragraph_error_before_anything_starts(lite0_onnx, capsys):
    ports = free_ports()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", ports.grpc))
        busy.listen()
        with pytest.raises(ScarletError, match=f"gRPC port {ports.grpc} on 127.0.0.1 is already in use"):
            check_ports_free(ports)
        assert main(["serve", "--onnx", str(lite0_onnx), "--http-port", str(ports.http), "--grpc-port",
                     str(ports.grpc), "--metrics-port", str(ports.metrics)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"gRPC port {ports.grpc} on 127.0.0.1 is already in use" in err and "Traceback" not in err


def test_load_measurement_reports_throughput_and_percentiles(server, lite0_onnx, images):
    from scarlet_deploy.runtime.serve.load import LoadConfig, measure

    _, ports = server
    cfg = LoadConfig(clients=2, seconds=1.0, rounds=1, protocol="http", max_requests=200)
    r = measure(f"127.0.0.1:{ports.http}", NAME, lite0_onnx, images[:2], get_spec("efficientnet_lite0").preprocess, cfg)
    assert r["requests"] > 0 and r["errors"] == 0 and r["served_img_s"][0] > 0 and r["inprocess_img_s"][0] > 0
    assert r["latency_ms"]["p50"] <= r["latency_ms"]["p90"] <= r["latency_ms"]["p99"]


def test_sigterm_stops_triton_with_no_process_left_and_ports_freed(server):
    proc, ports = server
    group = _group_of(proc.pid)
    assert len(group) >= 3, f"expected tritonserver and two stubs under scarlet serve, found {group}"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "Triton stopped (status 0)" in out
    assert not [pid for pid in group if _alive(pid)]
    check_ports_free(ports)  # raises if anything still listens
    assert not list(Path("/dev/shm").glob(f"scarlet_{proc.pid}_*")), "the Python backend's shared memory was left"


@pytest.fixture(scope="module")
def lite0_plan(lite0_onnx, tmp_path_factory):
    try:
        require_gpu()
    except ScarletError as e:
        pytest.skip(f"needs TensorRT 11 and an NVIDIA GPU: {e}")
    d = tmp_path_factory.mktemp("plan")
    plan = d / "lite0.fp32.plan"
    build_engine(EngineConfig(lite0_onnx, "fp32", plan, batch=BatchProfile(1, 4, 8), timing_cache=d / "t.cache"))
    return plan


@pytest.mark.gpu
def test_tensorrt_plan_is_served_by_the_same_code(lite0_plan, lite0_onnx, images, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    write_serving_repository(ServeRequest(lite0_onnx, "lite0_trt", engine=lite0_plan, batching=Batching(8, 500, 1)),
                             repo, launcher_paths())
    x = np.stack([deploy(f, get_spec("efficientnet_lite0").preprocess) for f in images])
    with TrtRunner(lite0_plan) as runner:
        ref = runner.infer(x)
    with TritonServer(repo, free_ports(), log_path=tmp_path / "triton.log") as srv:
        m, client = thttp, _client(thttp, srv.ports)
        y = _infer(m, client, "lite0_trt", "input", x, "FP32").as_numpy("logits")  # one request: the plan's batch 8
        assert np.abs(y - ref).max() / np.abs(ref).max() <= 1e-6
        r = _infer(m, client, "lite0_trt_image", "image", np.fromfile(images[0], np.uint8)[None], "UINT8")
        assert int(r.as_numpy("logits")[0].argmax()) == int(ref[0].argmax())
    assert main(["triton", "--onnx", str(lite0_onnx), "--engine", str(lite0_plan), "-o", str(tmp_path / "r"),
                 "--model", "trt"]) == 0
    assert "max_batch_size: 8" in (tmp_path / "r" / "trt" / "config.pbtxt").read_text()
