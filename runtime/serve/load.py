"""Load measurement: N concurrent single-image clients against the served model, next to in-process onnxruntime.

Both sides run in one process on one machine, in alternating rounds (in-process, served, in-process, ...), so
a change in machine load hits both; the ratio is the served throughput over the in-process one per round pair.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.core.host import CpuTimes, isa_text, load_text, machine_load, physical_cores
from scarlet_deploy.runtime.core.report import environment, fmt, markdown_table
from scarlet_deploy.runtime.data.preprocess import Preprocess, deploy_bytes
from scarlet_deploy.runtime.runners.ort import OrtOptions, OrtRunner

ENDPOINTS = ("tensor", "image")
PROTOCOLS = ("grpc", "http")


@dataclass(frozen=True)
class LoadConfig:
    clients: int = 16
    seconds: float = 10.0
    rounds: int = 3
    protocol: str = "grpc"
    endpoint: str = "tensor"
    baseline_batch: int = 8
    max_requests: int = 1_000_000  # per round, so a loop is bounded in count as well as time


@dataclass
class ServedRound:
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float] = field(repr=False)

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds


def _client(protocol: str, url: str):
    if protocol == "grpc":
        import tritonclient.grpc as m
    else:
        import tritonclient.http as m
    return m, m.InferenceServerClient(url)


def _request(m, endpoint: str, payload: np.ndarray) -> tuple[list, list]:
    if endpoint == "tensor":
        inp = m.InferInput("input", list(payload.shape), "FP32")
        out = [m.InferRequestedOutput("logits")]
    else:
        inp = m.InferInput("image", list(payload.shape), "UINT8")
        out = [m.InferRequestedOutput("probabilities", class_count=5)]
    inp.set_data_from_numpy(payload)
    return [inp], out


def served_round(url: str, model: str, payloads: list[np.ndarray], cfg: LoadConfig) -> ServedRound:
    """cfg.clients threads, each with its own connection, sending one image per request until time is up."""
    lock = threading.Lock()
    latencies: list[float] = []
    counts = {"ok": 0, "errors": 0}
    budget = threading.Semaphore(cfg.max_requests)
    start = threading.Barrier(cfg.clients + 1, timeout=60)  # a client that cannot connect breaks it, not hangs it
    stop_at = [float("inf")]  # set when every client is connected

    def worker(k: int) -> None:
        m, client = _client(cfg.protocol, url)
        reqs = [_request(m, cfg.endpoint, p) for p in payloads]
        mine, errors, i = [], 0, k
        start.wait()
        while time.perf_counter() < stop_at[0] and budget.acquire(blocking=False):
            inputs, outputs = reqs[i % len(reqs)]
            t0 = time.perf_counter()
            try:
                client.infer(model, inputs, outputs=outputs)
                t1 = time.perf_counter()
                if t1 <= stop_at[0]:  # a request still in flight at the end is not part of the window
                    mine.append((t1 - t0) * 1e3)
            except Exception:  # counted, not fatal: the report says how many failed
                errors += 1
            i += 1
        client.close()
        with lock:
            latencies.extend(mine)
            counts["ok"] += len(mine)
            counts["errors"] += errors

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(cfg.clients)]
    for t in threads:
        t.start()
    try:
        start.wait()
    except threading.BrokenBarrierError as e:
        raise ScarletError(f"not every one of the {cfg.clients} clients could connect to {url} within 60 s.") from e
    t0 = time.perf_counter()
    stop_at[0] = t0 + cfg.seconds
    for t in threads:
        t.join(cfg.seconds + 60)
    return ServedRound(counts["ok"], counts["errors"], cfg.seconds, latencies)


def inprocess_round(runner: OrtRunner, batch: np.ndarray, seconds: float, max_iters: int) -> float:
    """Images per second of back-to-back runner.infer_many (throughput mode: one batch per stream
    in flight, as the server's instances run them) for `seconds`."""
    many = [batch] * runner.streams(len(batch))
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds and n < max_iters:
        runner.infer_many(many)
        n += len(many)
    return n * len(batch) / (time.perf_counter() - t0)


def payloads_for(endpoint: str, files: list[Path], pre: Preprocess) -> list[np.ndarray]:
    if endpoint == "image":
        return [np.fromfile(str(f), dtype=np.uint8)[None] for f in files]
    return [deploy_bytes(np.fromfile(str(f), dtype=np.uint8), pre, str(f))[None] for f in files]


def group_cpu_seconds(pgid: int | None) -> float:
    """CPU seconds used so far by the processes of a group (the server and its stubs)."""
    if pgid is None:
        return 0.0
    total, hz = 0.0, os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the command: state ppid pgrp ... utime(11) stime(12)
            total += (float(fields[11]) + float(fields[12])) / hz
    return total


def measure(url: str, model: str, onnx: Path, files: list[Path], pre: Preprocess, cfg: LoadConfig,
            threads: int | None = None, server_pgid: int | None = None) -> dict[str, Any]:
    if cfg.endpoint not in ENDPOINTS or cfg.protocol not in PROTOCOLS:
        raise ScarletError(f"endpoint must be one of {ENDPOINTS} and protocol one of {PROTOCOLS}.")
    if not files:
        raise ScarletError("no images to send; pass --images DIR with JPEG/PNG files (the shared ImageNet sample works).")
    payloads = payloads_for(cfg.endpoint, files, pre)
    batch = np.stack([deploy_bytes(np.fromfile(str(f), dtype=np.uint8), pre, str(f))
                      for f in (files * cfg.baseline_batch)[:cfg.baseline_batch]])
    served_name = model if cfg.endpoint == "tensor" else f"{model}_image"
    runner = OrtRunner(onnx, options=OrtOptions(threads=threads)).load()
    for _ in range(3):
        runner.infer_many([batch] * runner.streams(len(batch)))
    served_round(url, served_name, payloads, LoadConfig(**{**asdict(cfg), "seconds": 1.0}))  # warm connections
    inproc, served = [], []
    cpu0, server0, t0 = CpuTimes.now(), group_cpu_seconds(server_pgid), time.perf_counter()
    for _ in tqdm(range(cfg.rounds), desc="load rounds", unit="round"):
        inproc.append(inprocess_round(runner, batch, cfg.seconds, cfg.max_requests))
        served.append(served_round(url, served_name, payloads, cfg))
    cpu1, server1 = CpuTimes.now(), group_cpu_seconds(server_pgid)
    if cpu0 and cpu1:  # the server is ours, not "other processes"
        cpu1 = CpuTimes(cpu1.busy, cpu1.steal, cpu1.own + server1 - server0)
    load = machine_load(cpu0, cpu1, time.perf_counter() - t0, physical_cores())
    runner.close()
    lat = np.concatenate([r.latencies_ms for r in served]) if any(r.latencies_ms for r in served) else np.zeros(1)
    ratios = [s.throughput / i for s, i in zip(served, inproc)]
    return {
        "config": asdict(cfg),
        "served_model": served_name,
        "served_img_s": [round(r.throughput, 1) for r in served],
        "inprocess_img_s": [round(x, 1) for x in inproc],
        "ratio_per_round": [round(x, 3) for x in ratios],
        "ratio_median": round(float(np.median(ratios)), 3),
        "latency_ms": {f"p{q}": round(float(np.percentile(lat, q)), 1) for q in (50, 90, 99)},
        "requests": sum(r.requests for r in served),
        "errors": sum(r.errors for r in served),
        "machine_load": load,
        "environment": environment(),
        "cpu_isa": isa_text(),
    }


def markdown(result: dict[str, Any]) -> str:
    c = result["config"]
    rows = [[f"Triton `{result['served_model']}` ({c['protocol']}, {c['clients']} clients x 1 image)",
             fmt(float(np.median(result["served_img_s"]))), result["latency_ms"]["p50"], result["latency_ms"]["p90"],
             result["latency_ms"]["p99"], fmt(result["ratio_median"], 3)],
            [f"in-process onnxruntime, batch {c['baseline_batch']}, throughput mode", fmt(float(np.median(result["inprocess_img_s"]))),
             "", "", "", "1"]]
    cpu = result["environment"]["machine"]["cpu"]
    return (f"# Serving load ({c['rounds']} rounds x {c['seconds']} s, alternating)\n\n"
            + markdown_table(["path", "img/s (median)", "p50 ms", "p90 ms", "p99 ms", "x in-process"], rows)
            + f"\n\n{result['requests']} requests, {result['errors']} errors. Per-round ratios: {result['ratio_per_round']}. "
            f"CPU: {cpu} ({result['cpu_isa']}), {physical_cores()} physical cores shared by server, clients and "
            f"in-process runs. {load_text(result['machine_load'])}\n")
