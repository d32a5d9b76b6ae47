"""Where onnxruntime spends its time, per operator type (and slowest nodes) of the graph it actually runs.

onnxruntime's own profiler times every kernel; this groups those times by operator type
after onnxruntime's fusions and layout changes (QLinearConv, ReorderOutput, ...), so that a
float operator left between Q/DQ pairs, or layout reorders around an unsupported op, show up.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from scarlet_deploy.runtime.core import cli_types
from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.core.host import check_batch_memory
from scarlet_deploy.runtime.core.onnx_io import read_io
from scarlet_deploy.runtime.core.paths import check_outputs
from scarlet_deploy.runtime.runners.ort import OrtOptions, make_session


@dataclass(frozen=True)
class OpTime:
    op_type: str
    nodes: int
    share_pct: float
    ms_per_run: float


@dataclass(frozen=True)
class NodeTime:
    node: str
    op_type: str
    share_pct: float
    ms_per_run: float


def kernel_times(onnx_path: str | os.PathLike, batch: int = 8, runs: int = 10, warmup: int = 2,
                 options: OrtOptions = OrtOptions()) -> dict[tuple[str, str], float]:
    """(node, operator type) -> kernel microseconds summed over `runs` runs after `warmup` runs."""
    from scarlet_deploy.runtime.bench.plan import bench_input, onnx_image_size

    if batch < 1 or runs < 1:
        raise ScarletError("--batch and --runs must be at least 1.")
    read_io(onnx_path)  # missing or not ONNX: one sentence, before onnxruntime's own message
    check_batch_memory(batch, onnx_image_size(Path(onnx_path)))
    with tempfile.TemporaryDirectory(prefix="scarlet-profile-") as d:
        session = make_session(onnx_path, options, profile_prefix=str(Path(d) / "ort"))
        x = bench_input(batch, size=onnx_image_size(Path(onnx_path)))
        feed = {session.get_inputs()[0].name: x}
        for _ in range(warmup + runs):
            session.run(None, feed)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    first = starts[warmup] if len(starts) > warmup else 0
    out: dict[tuple[str, str], float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first:
            key = (e["name"].removesuffix("_kernel_time"), e["args"]["op_name"])
            out[key] = out.get(key, 0.0) + e["dur"]
    return out


def by_operator(times: dict[tuple[str, str], float], runs: int) -> list[OpTime]:
    total: dict[str, float] = {}
    nodes: dict[str, int] = {}
    for (_, op), us in times.items():
        total[op] = total.get(op, 0.0) + us
        nodes[op] = nodes.get(op, 0) + 1
    all_us = sum(total.values()) or 1.0
    return sorted((OpTime(op, nodes[op], 100.0 * us / all_us, us / 1e3 / runs) for op, us in total.items()),
                  key=lambda o: -o.share_pct)


def slowest_nodes(times: dict[tuple[str, str], float], runs: int, n: int) -> list[NodeTime]:
    all_us = sum(times.values()) or 1.0
    ranked = sorted(times.items(), key=lambda kv: -kv[1])[:n]
    return [NodeTime(node, op, 100.0 * us / all_us, us / 1e3 / runs) for (node, op), us in ranked]


def profile(onnx_path: str | os.PathLike, batch: int = 8, runs: int = 10, warmup: int = 2,
            options: OrtOptions = OrtOptions()) -> list[OpTime]:
    """Kernel time per operator type, largest first."""
    return by_operator(kernel_times(onnx_path, batch, runs, warmup, options), runs)


def markdown(path: str, batch: int, ops: list[OpTime], nodes: list[NodeTime] = ()) -> str:
    from scarlet_deploy.runtime.core.report import markdown_table

    md = (f"onnxruntime kernel time by operator type: `{path}`, batch {batch}\n\n"
          + markdown_table(["operator", "nodes", "share %", "ms per run"],
                           [[o.op_type, o.nodes, f"{o.share_pct:.1f}", f"{o.ms_per_run:.2f}"] for o in ops]))
    if nodes:
        md += (f"\nThe {len(nodes)} slowest nodes (onnxruntime's names after its fusions):\n\n"
               + markdown_table(["node", "operator", "share %", "ms per run"],
                                [[n.node, n.op_type, f"{n.share_pct:.1f}", f"{n.ms_per_run:.3f}"] for n in nodes]))
    return md


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="onnxruntime kernel time per operator type (after its fusions)")
    p.add_argument("--onnx", required=True, type=cli_types.input_file(".onnx", as_path=False))
    p.add_argument("--batch", type=cli_types.positive_int, default=8)
    p.add_argument("--runs", type=cli_types.positive_int, default=10)
    p.add_argument("--threads", type=cli_types.positive_int, help="onnxruntime threads (default: physical cores)")
    p.add_argument("--nodes", type=cli_types.nonneg_int, default=0, help="also list this many slowest nodes")
    p.add_argument("--json", help="also write the table as JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from scarlet_deploy.runtime.core.artifacts import write_json_atomic

    if args.json:
        check_outputs([("--json", args.json)], [("--onnx", args.onnx)])
    times = kernel_times(args.onnx, args.batch, args.runs, options=OrtOptions(threads=args.threads))
    ops, nodes = by_operator(times, args.runs), slowest_nodes(times, args.runs, args.nodes)
    print(markdown(args.onnx, args.batch, ops, nodes), end="")
    if args.json:
        write_json_atomic(args.json, {"onnx": args.onnx, "batch": args.batch, "runs": args.runs,
                                      "ops": [asdict(o) for o in ops], "nodes": [asdict(n) for n in nodes]})
    return 0
