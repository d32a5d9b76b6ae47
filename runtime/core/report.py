"""Reports every command writes the same way: JSON for machines, a markdown table for people."""
from __future__ import annotations

import datetime as _dt
import os
import platform
from typing import Any, Iterable, Sequence

from scarlet_deploy.runtime.core.artifacts import tool_versions, write_bytes_atomic, write_json_atomic
from scarlet_deploy.runtime.core.host import isa_text


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 10 ** -(digits - 1) or abs(v) >= 1e6):
            return f"{v:.{max(digits - 2, 1)}e}"
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{digits - 1}f}".rstrip("0").rstrip(".")
    return str(v)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def environment() -> dict[str, Any]:
    """Date, machine and tool versions: what makes a number reproducible."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpu": cpu, "logical_cpus": os.cpu_count(), "isa": isa_text(), "platform": platform.platform()},
        "versions": tool_versions(),
    }


def write_reports(data: dict[str, Any], markdown: str, json_path: str | None = None, md_path: str | None = None) -> None:
    if json_path:
        write_json_atomic(json_path, data)
    if md_path:
        write_bytes_atomic(md_path, markdown.encode())
