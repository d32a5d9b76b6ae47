"""`scarlet serve`, `scarlet triton` and `scarlet serve-load`."""
from __future__ import annotations

import argparse
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

from scarlet_deploy.export.registry import MODELS, get_spec
from scarlet_deploy.runtime.core import cli_types
from scarlet_deploy.runtime.core.artifacts import read_manifest
from scarlet_deploy.runtime.core.cli_types import nonneg_int, port, positive_float, positive_int
from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.core.paths import check_outputs
from scarlet_deploy.runtime.core.host import physical_cores
from scarlet_deploy.runtime.core.report import write_reports
from scarlet_deploy.runtime.data.images import default_val_dir, list_images
from scarlet_deploy.runtime.serve.load import ENDPOINTS, PROTOCOLS, LoadConfig, markdown, measure
from scarlet_deploy.runtime.serve.repository import (
    SERVE_BACKENDS,
    TRITON_ONNX_BACKENDS,
    Batching,
    ExportRequest,
    ServeRequest,
    write_serving_repository,
    write_triton_repository,
)
from scarlet_deploy.runtime.serve.server import Ports, TritonServer, free_ports, launcher_paths


def default_name(onnx: str) -> str:
    """The manifest's registry model, else the file's stem: Triton model names are directory names."""
    m = read_manifest(onnx) or {}
    return m.get("model") or Path(onnx).name.split(".")[0]


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def model_name(args: argparse.Namespace) -> str:
    """--model, else default_name: a Triton model name is a folder in the repository, so it must be one plain
    name; a `/` or `..` in it would write outside -o and give Triton's config a name no URL can reach."""
    name = args.model if args.model is not None else default_name(args.onnx)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ScarletError(f"model name {name!r} (from {'--model' if args.model is not None else args.onnx}) is not a plain name; "
                           "pass --model NAME made of letters, digits, `_`, `.` and `-` (at most 128, starting with a "
                           "letter or digit).")
    return name


def _batching_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-batch", type=positive_int, default=32, help="largest dynamic batch (default 32)")
    p.add_argument("--max-queue-delay-us", type=nonneg_int, default=2000,
                   help="how long Triton may hold a request to grow a batch (default 2000 us)")
    p.add_argument("--instances", type=positive_int, default=None,
                   help="model instances per model (default: on CPU one per throughput-mode stream, as "
                        "`scarlet bench` measures onnxruntime's throughput mode, each with its share of the cores; "
                        "on a GPU 1)")


def default_instances(gpu: bool, cores: int) -> int:
    """Triton instances: a CPU model gets one per throughput-mode stream (concurrent batches on
    their own cores, as OrtRunner.infer_many runs them); a GPU one, one."""
    from scarlet_deploy.runtime.runners.ort import throughput_plan

    return 1 if gpu else throughput_plan(cores)[0]


def _batching(args: argparse.Namespace) -> Batching:
    if args.instances is None:
        args.instances = default_instances(bool(getattr(args, "engine", None) or getattr(args, "gpu", False)),
                                           physical_cores())
    return Batching(args.max_batch, args.max_queue_delay_us, args.instances)


def _package_args(args: argparse.Namespace) -> None:
    """`--package P`: the artifact, backend and model name a deploy package records, after its integrity check."""
    if not getattr(args, "package", None):
        if not args.onnx:
            raise ScarletError("pass --onnx MODEL.onnx (or --package DIR for a `scarlet deploy` package).")
        return
    from scarlet_deploy.runtime.deploy.check import read_deploy, require_intact

    if args.onnx or args.engine:
        raise ScarletError("--package serves the package's own artifact; drop --onnx/--engine.")
    root = Path(args.package)
    require_intact(root)
    pkg = read_deploy(root)["package"]
    if pkg.get("runtime") == "tensorrt":
        raise ScarletError(f"{root} holds a TensorRT plan: serve it on the GPU machine with "
                           f"`tritonserver --model-repository={root / 'triton'}`.")
    args.onnx = str(root / pkg["artifact"])
    args.backend = pkg["serve_backend"]
    args.model = args.model or pkg["serve_name"]


def _serve_request(args: argparse.Namespace) -> ServeRequest:
    _package_args(args)
    name = model_name(args)
    batching = _batching(args)
    return ServeRequest(Path(args.onnx), name, Path(args.engine) if args.engine else None,
                        model=args.preprocess_model or (name if name in MODELS else None), backend=args.backend,
                        # Instances split the cores between them rather than each taking all of them.
                        threads=args.threads or max(1, physical_cores() // batching.instances), batching=batching)


def _artifact_args(p: argparse.ArgumentParser, onnx_required: bool = True) -> None:
    p.add_argument("--onnx", required=onnx_required, type=cli_types.input_file(".onnx", as_path=False), help="the exported ONNX (names, types and dims are read from it)")
    p.add_argument("--engine", type=cli_types.input_file(".plan", as_path=False), help="a TensorRT plan built from that ONNX by `scarlet engine` (GPU only)")
    p.add_argument("--model", help="Triton model name (default: the manifest's model, else the file name)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model with Triton Inference Server (HTTP/REST and gRPC) until Ctrl-C")
    _artifact_args(p, onnx_required=False)
    p.add_argument("--package", help="a `scarlet deploy` package: serve its artifact on its backend, under its model "
                                     "name (instead of --onnx/--backend)")
    p.add_argument("--preprocess-model", help="registry model whose preprocessing NAME_image applies "
                                              "(default: the ONNX manifest's)")
    p.add_argument("--backend", choices=SERVE_BACKENDS, default="ort",
                   help="runtime behind both models: onnxruntime (default) or OpenVINO (ov, ov-bf16 where the CPU "
                        "has BF16); an INT8 Q/DQ ONNX on ov is OpenVINO INT8")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--http-port", type=port, default=8000)
    p.add_argument("--grpc-port", type=port, default=8001)
    p.add_argument("--metrics-port", type=port, default=8002)
    p.add_argument("--threads", type=positive_int, help="onnxruntime threads per instance (default: physical cores)")
    p.add_argument("--log", help="append Triton's log to this file (default: discarded)")
    _batching_args(p)
    p.set_defaults(func=run_serve)

    p = sub.add_parser("triton", help="write a Triton model repository (onnxruntime or TensorRT) for your own Triton")
    _artifact_args(p)
    p.add_argument("-o", "--out", required=True, help="repository directory (NAME/ is created inside it)")
    p.add_argument("--gpu", action="store_true", help="ONNX: GPU instance group instead of CPU")
    p.add_argument("--backend", choices=TRITON_ONNX_BACKENDS, default="ort",
                   help="ONNX: Triton's onnxruntime backend (default) or its openvino backend (CPU)")
    _batching_args(p)
    p.set_defaults(func=run_triton)

    p = sub.add_parser("serve-load", help="concurrent single-image clients against `scarlet serve`'s Triton, "
                                          "next to in-process onnxruntime")
    _artifact_args(p)
    p.add_argument("--preprocess-model", help=argparse.SUPPRESS)
    p.add_argument("--images", help="folder of real images to send (default: the shared ImageNet sample)")
    p.add_argument("--clients", type=positive_int, default=16)
    p.add_argument("--seconds", type=positive_float, default=10.0, help="per round and side (default 10)")
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--protocol", choices=PROTOCOLS, default="grpc")
    p.add_argument("--endpoint", choices=ENDPOINTS, default="tensor",
                   help="tensor: NAME with preprocessed images; image: NAME_image with the encoded files")
    p.add_argument("--threads", type=positive_int, help="onnxruntime threads, served and in-process (default: physical cores)")
    p.add_argument("--log", help="append Triton's log to this file")
    p.add_argument("--json")
    p.add_argument("--markdown")
    _batching_args(p)
    p.set_defaults(func=run_load, backend="ort")  # the comparison is with in-process onnxruntime


class _Stop(Exception):
    pass


def _raise_stop(signum, _frame) -> None:
    raise _Stop(signal.Signals(signum).name)


def run_serve(args: argparse.Namespace) -> int:
    ports = Ports(args.http_port, args.grpc_port, args.metrics_port)
    req = _serve_request(args)
    with tempfile.TemporaryDirectory(prefix="scarlet-serve-") as repo:
        served = write_serving_repository(req, Path(repo), launcher_paths())
        server = TritonServer(Path(repo), ports, host=args.host, log_path=Path(args.log) if args.log else None)
        previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            server.start()
            print(f"serving {', '.join(served['models'])} ({served['backend']} over {served['artifact']}; dynamic batches "
                  f"up to {served['max_batch']}, {served['max_queue_delay_us']} us queue delay, {served['instances']} "
                  f"instance(s))\n  HTTP/REST http://{server.http_url}/v2/models/{req.name}\n  gRPC      {server.grpc_url}"
                  f"\n  metrics   http://{args.host}:{ports.metrics}/metrics\nCtrl-C or SIGTERM stops it.", flush=True)
            while server.proc.poll() is None:
                time.sleep(0.5)
            raise ScarletError(f"tritonserver exited on its own with status {server.proc.returncode}; "
                               "rerun with --log FILE to see why.")
        except _Stop as s:
            print(f"{s}: stopping Triton ...", file=sys.stderr, flush=True)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the clean-up
            code = server.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    # stop() has reaped the server and checked that nothing of its process group is left.
    print(f"Triton stopped (status {code}); no process left, ports freed.", file=sys.stderr)
    return 0


def run_triton(args: argparse.Namespace) -> int:
    name = model_name(args)
    d = write_triton_repository(ExportRequest(Path(args.onnx), Path(args.out), name,
                                              Path(args.engine) if args.engine else None,
                                              "KIND_GPU" if args.gpu else "KIND_CPU", _batching(args), args.backend))
    print(f"wrote {d}: run `tritonserver --model-repository={Path(args.out).resolve()}`")
    return 0


def run_load(args: argparse.Namespace) -> int:
    check_outputs([("--json", args.json), ("--markdown", args.markdown)], [("--onnx", args.onnx)])
    req = _serve_request(args)
    if args.engine:
        raise ScarletError("serve-load compares with in-process onnxruntime; run it with --onnx only.")
    root = Path(args.images) if args.images else default_val_dir()
    files = list_images(root)[:64] if root else []
    cfg = LoadConfig(args.clients, args.seconds, args.rounds, args.protocol, args.endpoint)
    with tempfile.TemporaryDirectory(prefix="scarlet-serve-") as repo:
        served = write_serving_repository(req, Path(repo), launcher_paths())
        with TritonServer(Path(repo), free_ports(), log_path=Path(args.log) if args.log else None) as server:
            url = server.grpc_url if cfg.protocol == "grpc" else server.http_url
            result = measure(url, req.name, Path(args.onnx), files, get_spec(served["model"]).preprocess, cfg,
                             threads=args.threads, server_pgid=server.proc.pid)
    result["served"] = served
    text = markdown(result)
    write_reports(result, text, args.json, args.markdown)
    print(text)
    return 0
