"""What the machine is: cores, vector ISA, and how busy it was while we measured."""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache


@lru_cache(maxsize=1)
def physical_cores() -> int:
    """Physical cores (hyper-threads share execution units, so ORT gains nothing from them)."""
    try:
        pairs, phys, core = set(), None, None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                    pairs.add((phys, core))
        if pairs:
            return min(len(pairs), len(os.sched_getaffinity(0)))
    except OSError:
        pass
    return os.cpu_count() or 1


@dataclass(frozen=True)
class CpuTimes:
    """CPU seconds since boot: busy on the whole machine (/proc/stat), stolen by the hypervisor,
    and used by this process and the children it waited for (getrusage)."""
    busy: float
    steal: float
    own: float

    @classmethod
    def now(cls, stat_path: str = "/proc/stat") -> "CpuTimes | None":
        import resource

        try:
            with open(stat_path) as f:
                fields = [float(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0.0] * 8)[:8]
        own = sum(getattr(resource.getrusage(w), a) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for a in ("ru_utime", "ru_stime"))
        return cls((user + nice + system + irq + softirq) / hz, steal / hz, own)


def machine_load(start: CpuTimes | None, end: CpuTimes | None, wall_s: float, cpus: int) -> dict[str, float] | None:
    """What else ran during a measurement, as percent of all CPUs: benchmarks on a shared or
    noisy machine are only comparable when this is near zero."""
    if start is None or end is None or wall_s <= 0:
        return None
    capacity = wall_s * cpus
    other = max(0.0, (end.busy - start.busy) - (end.own - start.own))
    return {"other_processes_pct": 100 * other / capacity, "steal_pct": 100 * (end.steal - start.steal) / capacity}


LOAD_WARN_PCT = 5.0


def load_text(load: dict[str, float] | None) -> str:
    if load is None:
        return "Machine load not measured (no /proc/stat)."
    text = (f"Other processes used {load['other_processes_pct']:.1f} % of the CPUs during the run "
            f"(hypervisor steal {load['steal_pct']:.1f} %).")
    if load["other_processes_pct"] + load["steal_pct"] > LOAD_WARN_PCT:
        text += " **Over 5 %: these numbers are suspect; rerun on an idle machine.**"
    return text


# What decides which CPU kernels onnxruntime, OpenVINO and torch can use: 8-bit dot products
# (VNNI, AMX-INT8) for INT8 (without them MLAS saturates 16-bit pair sums, see calib.qdq), BF16
# dot products for bf16, AVX-512 / AVX2 for everything else. Name -> /proc/cpuinfo flags.
ISA_FLAGS = {"AVX2": ("avx2",), "AVX-512": ("avx512f",), "VNNI": ("avx512_vnni", "avx_vnni"),
             "BF16": ("avx512_bf16",), "AMX": ("amx_tile",), "AMX-INT8": ("amx_int8",),
             "AMX-BF16": ("amx_bf16",)}
HOST = object()  # cpu_isa's default: this machine's flags


@lru_cache(maxsize=4)
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The CPU's feature flags (None: no /proc/cpuinfo to read)."""
    try:
        with open(cpuinfo) as f:
            return frozenset(next((ln for ln in f if ln.startswith("flags")), "").split(":", 1)[-1].split())
    except OSError:
        return None


def cpu_isa(flags: frozenset[str] | None | object = HOST) -> dict[str, bool] | None:
    """Which of ISA_FLAGS the CPU has (None: unknown)."""
    flags = cpu_flags() if flags is HOST else flags
    if flags is None:
        return None
    return {name: any(f in flags for f in names) for name, names in ISA_FLAGS.items()}


def isa_text(isa: dict[str, bool] | None | object = HOST) -> str:
    """'AVX2, AVX-512, VNNI': the ISA a speed figure was measured on, for every report."""
    isa = cpu_isa() if isa is HOST else isa
    if isa is None:
        return "unknown (no /proc/cpuinfo)"
    return ", ".join(name for name, has in isa.items() if has) or "none of " + ", ".join(isa)


def has_vnni(flags: frozenset[str] | None | object = HOST) -> bool:
    isa = cpu_isa(flags)
    return bool(isa) and (isa["VNNI"] or isa["AMX-INT8"])


# Resident memory onnxruntime needs per image of a batch, as a multiple of the image's FP32 input tensor:
# measured for EfficientNet-Lite0 at 224 px on the CPU (peak RSS 396 MiB at batch 32, 680 MiB at 64:
# 8.9 MiB an image, 15.5x its 0.57 MiB input), rounded up; the input itself is one more.
ACTIVATIONS_PER_INPUT = 16


def available_memory_bytes() -> int | None:
    """What this process can still allocate: the kernel's MemAvailable, lowered to what the cgroup
    (a container's limit) has left. None where neither can be read."""
    found: list[int] = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            found.append(int(limit) - int(open("/sys/fs/cgroup/memory.current").read()))
    except (OSError, ValueError):
        pass
    return max(min(found), 0) if found else None


def check_batch_memory(batch: int, image_size: int, flag: str = "--batch") -> None:
    """Refuse, before any work, a batch whose input and activations cannot fit in the memory available
    (a MemoryError minutes later, or the kernel's OOM killer, is the alternative)."""
    from scarlet_deploy.runtime.core.errors import ScarletError

    per_image = 3 * image_size * image_size * 4 * (1 + ACTIVATIONS_PER_INPUT)
    need, have = batch * per_image, available_memory_bytes()
    if have is not None and need > have:
        fits = max(have // per_image, 1)
        raise ScarletError(f"{flag} {batch} needs about {need / 2**30:.1f} GiB ({per_image / 2**20:.1f} MiB an image of "
                           f"{image_size}x{image_size}: its input and the runtime's activations), but this machine has "
                           f"{have / 2**30:.1f} GiB available; pass {flag} {fits} or less.")
