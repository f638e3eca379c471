"""The device a run measures: a fingerprint (what it is, which software) and its measured peaks.

Peaks are measured, never typed (docs/design.md "% of peak"), and they are the hardware's, not a library's:
- compute, per dtype: the native extension's register-resident multiply-add loop of the widest instruction
  the CPU runs for that dtype (AVX-512 / AVX2 FMA, AVX512-BF16, AMX, NEON), on every thread the kernels use
  (csrc/cpu/probes.cpp); on CUDA the tensor-core / FMA loop kernels (csrc/cuda/probes.cu);
- bandwidth: STREAM-style read, copy, triad (and copy with non-temporal stores) over buffers >= 4x the
  last-level cache; the peak is the best of them, all are kept.
The best vendor GEMM rate (the largest torch.matmul that fits a time budget) is kept beside them as the
"vendor ceiling": a second, lower roof, never the peak. All are cached per machine id in ~/.cache/pykernels
(PYKERNELS_CACHE_DIR overrides) so a sweep pays for them once. Spec-sheet figures sit beside them where this
file knows the device (GPU datasheets; CPU: cores x measured clock x FLOP/cycle of the micro-architecture).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from .timing import cpu_caches, cpu_llc_bytes

PEAKS_VERSION = 2  # 2: machine ids from the hardware identity; hardware peak probes (older caches ignored)

# Spec-sheet figures (dense, no sparsity) per GPU name pattern: FLOP/s per dtype and bytes/s of memory.
# float32 is the non-tensor-core FMA rate (what an fp32 GEMM without TF32 can reach).
GPU_SPECS: list[tuple[str, dict]] = [
    (r"H200", {"flops": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12}, "bandwidth": 4.8e12,
               "source": "NVIDIA H200 SXM datasheet"}),
    (r"H100.*(PCIe|PCIE)", {"flops": {"bfloat16": 756e12, "float16": 756e12, "float32": 51e12},
                            "bandwidth": 2.0e12, "source": "NVIDIA H100 PCIe datasheet"}),
    (r"H100", {"flops": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12}, "bandwidth": 3.35e12,
               "source": "NVIDIA H100 SXM datasheet"}),
    (r"A100.*80GB", {"flops": {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12}, "bandwidth": 2.039e12,
                     "source": "NVIDIA A100 80GB SXM datasheet"}),
    (r"A100", {"flops": {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12}, "bandwidth": 1.555e12,
               "source": "NVIDIA A100 40GB datasheet"}),
]

# CPU FLOP per cycle per core by micro-architecture (vector FMA throughput), a cross-check of the probes:
# Zen 3: 2 x 256-bit FMA pipes = 16 fp32 FMA = 32 FLOP/cycle; no bf16 arithmetic (AMD Software Optimization
#   Guide for family 19h).
# Zen 4: AVX-512 on 2 x 256-bit FMA pipes = 32 fp32 FLOP/cycle; VDPBF16PS doubles it for bf16 (64) (same guide).
# Zen 5 (EPYC 9005): 2 x 512-bit FMA pipes = 64 fp32 FLOP/cycle, bf16 dot 128 (AMD optimization guide, family 1Ah).
# Sapphire Rapids: 2 x 512-bit FMA = 64 fp32; AMX-BF16 1024 (Intel).
CPU_FLOP_PER_CYCLE = {
    "zen3": {"float32": 32},
    "zen4": {"float32": 32, "bfloat16": 64},
    "zen5": {"float32": 64, "bfloat16": 128},
    "sapphire_rapids": {"float32": 64, "bfloat16": 1024},
}

# Micro-architecture names: x86 by (vendor, family, model range), ARM by (implementer, part).
_X86_ARCH = [
    ("AuthenticAMD", 23, range(0x30), "zen", "Zen/Zen+"),
    ("AuthenticAMD", 23, range(0x30, 0x100), "zen2", "Zen 2"),
    ("AuthenticAMD", 25, range(0x10), "zen3", "Zen 3"),
    ("AuthenticAMD", 25, range(0x20, 0x60), "zen3", "Zen 3"),
    ("AuthenticAMD", 25, range(0x10, 0x20), "zen4", "Zen 4"),
    ("AuthenticAMD", 25, range(0x60, 0x100), "zen4", "Zen 4"),
    ("AuthenticAMD", 26, range(0x100), "zen5", "Zen 5"),
    ("GenuineIntel", 6, (85,), "skylake_sp", "Skylake/Cascade Lake-SP"),
    ("GenuineIntel", 6, (106, 108), "icelake_sp", "Ice Lake-SP"),
    ("GenuineIntel", 6, (143,), "sapphire_rapids", "Sapphire Rapids"),
    ("GenuineIntel", 6, (207,), "emerald_rapids", "Emerald Rapids"),
    ("GenuineIntel", 6, (173, 174), "granite_rapids", "Granite Rapids"),
]
_ARM_ARCH = {("0x41", "0xd0c"): ("neoverse_n1", "Neoverse N1"), ("0x41", "0xd40"): ("neoverse_v1", "Neoverse V1"),
             ("0x41", "0xd49"): ("neoverse_n2", "Neoverse N2"), ("0x41", "0xd4f"): ("neoverse_v2", "Neoverse V2")}


# ---------------------------------------------------------------------------------------------------
# fingerprint


def _cpuinfo() -> dict:
    info: dict = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if not line.strip():
            break  # first processor only
        k, _, v = line.partition(":")
        info[k.strip()] = v.strip()
    return info


_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16", "asimd", "sve", "sve2")


def cpu_microarch(info: dict, flags: set[str] = frozenset()) -> tuple[str, str] | None:
    """(key, readable name) of the CPU's micro-architecture, or None when unknown."""
    vendor = info.get("vendor_id", "")
    try:
        fam, model = int(info.get("cpu family", "-1")), int(info.get("model", "-1"))
    except ValueError:
        fam, model = -1, -1
    for v, f, models, key, name in _X86_ARCH:
        if vendor == v and fam == f and model in models:
            return key, name
    arm = _ARM_ARCH.get((info.get("CPU implementer", "").lower(), info.get("CPU part", "").lower()))
    if arm:
        return arm
    if vendor == "GenuineIntel" and "amx_bf16" in flags:
        return "sapphire_rapids", "Sapphire Rapids"
    return None


def cpu_arch(info: dict, flags: set[str]) -> str | None:
    """The micro-architecture key (for the FLOP/cycle table), or None when unknown."""
    m = cpu_microarch(info, flags)
    return m[0] if m else None


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "triton", "numpy", "pykernels", "pytest-benchmark"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def cpu_fingerprint() -> dict:
    import torch

    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    fp = {
        "type": "cpu",
        "name": info.get("model name") or platform.processor() or platform.machine(),
        "vendor": info.get("vendor_id"),
        "family_model": f"{info.get('cpu family', '?')}/{info.get('model', '?')}",
        "stepping": info.get("stepping"),
        "arch": cpu_arch(info, flags),
        "microarch": (cpu_microarch(info, flags) or (None, None))[1],
        "arm_part": f"{info.get('CPU implementer')}/{info.get('CPU part')}" if "CPU part" in info else None,
        "caches": cpu_caches(),
        "cores": cores,
        "threads": torch.get_num_threads(),
        "mhz": float(info["cpu MHz"]) if "cpu MHz" in info else None,
        "isa": sorted(f for f in _ISA_FLAGS if f in flags),
        "torch_cpu_capability": getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: None)(),
    }
    fp["llc_bytes"] = cpu_llc_bytes()
    return fp


def cuda_fingerprint(index: int = 0) -> dict:
    import torch

    p = torch.cuda.get_device_properties(index)
    fp = {
        "type": "cuda",
        "index": index,
        "name": p.name,
        "capability": f"{p.major}.{p.minor}",
        "sm_count": p.multi_processor_count,
        "memory_bytes": p.total_memory,
        "l2_bytes": getattr(p, "L2_cache_size", None),
        "uuid": str(getattr(p, "uuid", "")) or None,
        "cuda_runtime": torch.version.cuda,
        "driver": None,
        "clocks_mhz": None,
    }
    try:  # optional: nvidia-ml-py
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        fp["driver"] = pynvml.nvmlSystemGetDriverVersion()
        fp["clocks_mhz"] = {"sm_max": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
                            "mem_max": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM)}
    except Exception as e:  # noqa: BLE001 - absent or failing NVML only loses two fields
        fp["nvml"] = f"unavailable: {type(e).__name__}"
    return fp


def identity(device: str = "cpu") -> dict:
    """What the device is (the hardware and the host, IDENTITY_KEYS), without the software: enough for
    machine_id, and it never loads the native extension (pykernels tune keys its cache on it while the
    extension is being loaded)."""
    dev = str(device)
    fp = cuda_fingerprint(int(dev.split(":")[1]) if ":" in dev else 0) if dev.startswith("cuda") else cpu_fingerprint()
    fp["host"] = platform.node()
    # A device tag (set by `pykernels fleet` for a declared device, e.g. a plugin device on a CPU host): part
    # of the identity, so that two declared devices of one machine are never merged into one.
    tag = os.environ.get("PYKERNELS_DEVICE_TAG")
    if tag:
        fp["tag"] = tag
    return fp


def fingerprint(device: str = "cpu") -> dict:
    """What the device is and which software drives it (JSON-serialisable)."""
    fp = identity(device)
    fp["os"] = f"{platform.system()} {platform.release()}"
    fp["versions"] = _versions()
    try:
        from ..backends.native import _ext  # the extension as the kernels run: a cached tuning applied

        ext = _ext()
        fp["build"] = dict(ext.build_info())
        fp["cpu_features"] = dict(ext.cpu_features())
    except Exception as e:  # noqa: BLE001 - the extension may not be built; that is a fact worth recording
        fp["build"] = {"error": f"{type(e).__name__}: {e}"}
    fp["id"] = machine_id(fp)
    return fp


# What makes two devices different hardware (the host is added: two machines are two devices). Not the
# software versions, the clock reading or the build: those change on the same hardware.
IDENTITY_KEYS = {
    "cpu": ("name", "vendor", "family_model", "stepping", "arm_part", "isa", "cores", "threads", "caches",
            "llc_bytes"),
    "cuda": ("name", "uuid", "capability", "sm_count", "memory_bytes", "l2_bytes", "driver", "index"),
}


def machine_id(fp: dict) -> str:
    """Short stable id of the hardware identity (IDENTITY_KEYS of its type) and the host: the key of the peaks
    cache, and what keeps two devices apart in reports even when their labels are the same."""
    keys = IDENTITY_KEYS.get(fp.get("type"), ("name", "index"))
    parts = [fp.get("host"), fp.get("type"), *[fp.get(k) for k in keys]]
    if fp.get("tag"):  # only when set: untagged devices keep the ids (and peaks caches) they had
        parts.append({"tag": fp["tag"]})
    key = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def device_label(fp: dict) -> str:
    """'cpu: AMD EPYC Zen 3 (2 threads)' / 'cuda: NVIDIA H100 80GB HBM3' (+ ' [tag]' for a tagged device)."""
    if fp.get("tag"):
        return f"{device_label({k: v for k, v in fp.items() if k != 'tag'})} [{fp['tag']}]"
    if fp.get("type") == "cpu":
        name = str(fp.get("name"))
        arch = fp.get("microarch")
        if arch and arch.lower() not in name.lower():
            name = f"{name} {arch}"
        n = fp.get("threads")
        return f"cpu: {name} ({n} thread{'' if n == 1 else 's'})"
    return f"{fp.get('type')}: {fp.get('name')}"


# ---------------------------------------------------------------------------------------------------
# spec-sheet figures


def spec_peaks(fp: dict, measured: dict | None = None) -> dict:
    """{'flops': {dtype: FLOP/s}, 'bandwidth': bytes/s or None, 'source': str} where known, else {}. For a CPU:
    threads x clock x FLOP/cycle of its micro-architecture, with the clock measured by the clock probe when
    `measured` holds one (cpuinfo's MHz otherwise)."""
    if fp.get("type") == "cuda":
        for pat, spec in GPU_SPECS:
            if re.search(pat, str(fp.get("name", ""))):
                return json.loads(json.dumps(spec))
        return {}
    arch = fp.get("arch")
    ghz = next((f.get("ghz") for f in ((measured or {}).get("flops") or {}).values() if f and f.get("ghz")), None)
    mhz, clock = (ghz * 1e3, "measured clock") if ghz else (fp.get("mhz"), "cpuinfo MHz")
    if fp.get("type") == "cpu" and arch in CPU_FLOP_PER_CYCLE and mhz:
        per = CPU_FLOP_PER_CYCLE[arch]
        hz = mhz * 1e6
        n = fp.get("threads") or fp.get("cores") or 1
        return {"flops": {dt: n * hz * f for dt, f in per.items()}, "bandwidth": None,
                "source": f"{n} cores x {mhz:.0f} MHz ({clock}) x FLOP/cycle/core of {arch} {per}"}
    return {}


# ---------------------------------------------------------------------------------------------------
# measured peaks


def cache_dir() -> Path:
    return Path(os.environ.get("PYKERNELS_CACHE_DIR") or Path.home() / ".cache" / "pykernels")


def bandwidth_probe(device: str = "cpu", budget_s: float = 1.5) -> dict:
    """Memory bandwidth of a buffer >= 4x the last-level cache (CPU: >= 256 MiB; GPU: >= 1 GiB), two ways:
    copy (dst.copy_(src), bytes read + written; write-allocate traffic is not counted) and read (src.sum(),
    bytes read). bytes_per_s, the peak used for % of peak, is the larger: read-dominated kernels (GEMV,
    decode) can beat a copy. Both are timed in turns so that a busy spell hits them alike."""
    import torch

    from . import timing

    if str(device).startswith("cuda"):
        nbytes = max(1 << 30, 4 * timing.cuda_l2_bytes(device))
    else:
        nbytes = max(256 << 20, 4 * timing.cpu_llc_bytes())
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    opts = timing.TimingOptions(budget_s=budget_s, rse_target=0.005, min_rounds=5, warmup_s=0.1)
    if str(device).startswith("cuda"):
        copy = timing.time_callable(lambda: dst.copy_(src), device, opts)
        read = timing.time_callable(lambda: src.sum(), device, opts)
    else:
        copy, read = timing.time_round_robin_cpu([lambda: dst.copy_(src), lambda: src.sum()], opts)
    copy_bps, read_bps = 2 * nbytes / copy.median_s, nbytes / read.median_s
    return {"bytes_per_s": max(copy_bps, read_bps), "copy_bytes_per_s": copy_bps, "read_bytes_per_s": read_bps,
            "nbytes": nbytes, "copy_median_s": copy.median_s, "read_median_s": read.median_s,
            "probe": "max of copy (read + write bytes) and sum (read bytes)"}


# The native compute probes that can serve a dtype: its own instructions first, then the fp32 FMA loops (a
# bf16/fp16 kernel without bf16/fp16 arithmetic converts to fp32 and runs on them). The best that runs wins.
_CPU_PROBES = {
    "float32": ("avx512_fp32", "avx2_fp32", "neon_fp32"),
    "bfloat16": ("amx_bf16", "avx512_bf16", "neon_bf16", "avx512_fp32", "avx2_fp32", "neon_fp32"),
    "float16": ("avx512_fp16", "neon_fp16", "avx512_fp32", "avx2_fp32", "neon_fp32"),
}
_CUDA_PROBES = {"float32": ("fma_fp32",), "bfloat16": ("mma_bf16",), "float16": ("mma_fp16",)}


def hardware_compute_probe(device: str, dtype_name: str, seconds: float = 0.3) -> dict | None:
    """The hardware's multiply-add peak for `dtype_name` from the native probes: the fastest of the probe
    kinds that serve that dtype and run here. None when the extension or every probe is unavailable."""
    try:
        from .. import _C
    except ImportError:
        return None
    cuda = str(device).startswith("cuda")
    kinds = _CUDA_PROBES.get(dtype_name, ()) if cuda else _CPU_PROBES.get(dtype_name, ())
    try:
        kinds_here = _C.probe_kinds()
        have = set(kinds_here["cuda_compute" if cuda else "compute"])
    except (AttributeError, KeyError):
        return None
    best = None
    for kind in kinds:
        if kind not in have:
            continue
        r = _C.probe_cuda_compute(kind, seconds) if cuda else _C.probe_compute(kind, None, seconds)
        # CPU: per second of each thread's own CPU time (the cores' rate while they run), so that a probe taken
        # while other jobs share the cores does not set a low peak (on the shared 2-core Zen 4 VM the wall figure
        # of one run was 15% of cores x clock x FLOP/cycle, the CPU-time figure 99-100% in every run).
        flops = float(r["flops"]) if cuda else max(float(r["flops"]), float(r.get("flops_cpu_time") or 0.0))
        if best is None or flops > best["flops_per_s"]:
            best = {"flops_per_s": flops, "flops_wall": float(r["flops"]), "kind": kind, "instruction": r.get("instruction"),
                    "threads": r.get("threads"), "accumulators": r.get("accumulators"), "seconds": seconds,
                    "probe": f"register-resident {r.get('instruction')} loop"
                             + (f", {r.get('accumulators')} accumulators, {r.get('threads')} threads"
                                if not cuda else " (CUDA, unverified on a GPU)")}
    if best and not cuda and kinds_here.get("clock"):
        clk = _C.probe_clock(None)
        best["ghz"] = clk["ghz"]
        best["flop_per_cycle_per_core"] = best["flops_per_s"] / (clk["ghz"] * 1e9 * max(1, best["threads"] or 1))
    return best


def hardware_bandwidth_probe(device: str, fp: dict, reps: int = 5) -> dict | None:
    """STREAM-style read / copy / triad / non-temporal copy of the native extension over buffers of
    max(4x LLC, 256 MiB) each; bytes_per_s is the best of them (all kept). None without the extension."""
    try:
        from .. import _C
    except ImportError:
        return None
    cuda = str(device).startswith("cuda")
    try:
        kinds = _C.probe_kinds()["cuda_memory" if cuda else "memory"]
    except (AttributeError, KeyError):
        return None
    if not kinds:
        return None
    nbytes = None if cuda else max(256 << 20, 4 * int(fp.get("llc_bytes") or (32 << 20)))
    runs = {}
    for kind in kinds:
        r = _C.probe_cuda_memory(kind, nbytes, reps) if cuda else _C.probe_memory(kind, nbytes, None, reps)
        runs[kind] = float(r["gbs"]) * 1e9
    best = max(runs, key=runs.get)
    return {"bytes_per_s": runs[best], "best": best, "runs_bytes_per_s": runs, "array_bytes": nbytes,
            "probe": f"STREAM-style {', '.join(runs)} over {((nbytes or 0) >> 20)} MiB arrays (native), best of {reps}"
                     + (" (CUDA, unverified on a GPU)" if cuda else "")}


def peak_bandwidth_probe(device: str, fp: dict, reps: int = 5, budget_s: float = 1.5) -> dict:
    """The probe behind the peak bandwidth: the native STREAM-style probes (best of `reps`), or where the extension has
    none, torch's copy and sum (`budget_s`), marked so in 'probe'."""
    return hardware_bandwidth_probe(device, fp, reps=reps) or dict(
        bandwidth_probe(device, budget_s), probe="torch copy and sum (no native probe here)")


def compute_probe(device: str, dtype_name: str, budget_s: float = 2.0, max_n: int | None = None) -> dict:
    """The vendor ceiling: the largest square torch.matmul (vendor GEMM) that fits the budget: n doubles from 256 while one call
    stays under ~budget/20; the best FLOP/s seen is the peak. Returns {'flops_per_s', 'n', 'median_s'}."""
    import torch

    from ..kernels._common import dtype_of
    from . import timing

    dt = dtype_of(dtype_name)
    cuda = str(device).startswith("cuda")
    max_n = max_n or (16384 if cuda else 4096)
    best = None
    n = 256
    t_end = time.perf_counter() + budget_s
    while n <= max_n:
        a = torch.randn(n, n, device=device).to(dt)
        b = torch.randn(n, n, device=device).to(dt)
        per = max(0.05, (t_end - time.perf_counter()) / 4)
        st = timing.time_callable(lambda a=a, b=b: torch.matmul(a, b), device,
                                  timing.TimingOptions(budget_s=per, rse_target=0.02, min_rounds=3, warmup_s=0.02,
                                                       warmup_calls=1))
        f = 2 * n**3 / st.median_s
        if best is None or f > best["flops_per_s"]:
            best = {"flops_per_s": f, "n": n, "median_s": st.median_s, "probe": "square torch.matmul"}
        if st.median_s * 20 > budget_s or time.perf_counter() > t_end:
            break
        n *= 2
    return best


def _cache_path(fp: dict) -> Path:
    return cache_dir() / f"peaks-{fp.get('type')}-{fp['id']}.json"


def load_cached_peaks(fp: dict) -> dict:
    path = _cache_path(fp)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("version") != PEAKS_VERSION:
        return {}
    return data


def peaks(device: str = "cpu", dtypes=("float32",), *, refresh: bool = False, measure: bool = True,
          fp: dict | None = None, budget_s: float = 1.5) -> dict:
    """Measured peaks of `device` for `dtypes`, from the per-machine cache or measured now (and cached):
    {'bandwidth': {...}, 'flops': {dtype: {...}}, 'vendor_ceiling': {dtype: {...}}, 'spec': {...},
    'measured_at': ...}. 'flops' and 'bandwidth' are the hardware's (native probes; where those are
    unavailable, the vendor GEMM and a torch copy, marked so in 'probe'); 'vendor_ceiling' is the best vendor
    GEMM rate. With measure=False only what the cache holds is returned."""
    fp = fp or fingerprint(device)
    data = {} if refresh else load_cached_peaks(fp)
    data.setdefault("version", PEAKS_VERSION)
    data.setdefault("flops", {})
    data.setdefault("vendor_ceiling", {})
    changed = False
    if measure and not data.get("bandwidth"):
        data["bandwidth"] = peak_bandwidth_probe(device, fp, budget_s=budget_s)
        changed = True
    for dt in dtypes:
        if measure and dt not in data["vendor_ceiling"]:
            data["vendor_ceiling"][dt] = compute_probe(device, dt, budget_s)
            changed = True
        if measure and dt not in data["flops"]:
            data["flops"][dt] = hardware_compute_probe(device, dt) or dict(
                data["vendor_ceiling"][dt], probe="vendor GEMM (no native probe for this dtype here)")
            changed = True
    data["spec"] = spec_peaks(fp, data)
    if changed:
        data["measured_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        _save(fp, data)
    data["cache"] = str(_cache_path(fp))
    return data


def write_cache(path: Path, data: dict) -> Path:
    """Write a per-machine cache file (the peaks, `pykernels tune`'s record) whole or not at all: JSON to a
    temporary file, then renamed over `path`; the in-memory "cache" key (the file's own path) is left out.
    OSError when it cannot be written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({k: v for k, v in data.items() if k != "cache"}, indent=1) + "\n")
    tmp.replace(path)
    return path


def _save(fp: dict, data: dict) -> None:
    try:
        write_cache(_cache_path(fp), data)
    except OSError:
        pass  # a read-only home loses only the cache


def raise_bandwidth_peak(pk: dict, fp: dict, probe: dict) -> bool:
    """Keep the best bandwidth seen on this machine: a probe above the cached peak replaces it (in `pk` and in
    the cache file). A probe taken while other jobs load the machine never lowers the peak."""
    old = peak_bandwidth(pk) or 0.0
    if probe.get("bytes_per_s", 0.0) <= old:
        return False
    pk["bandwidth"] = probe
    pk["measured_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    _save(fp, pk)
    return True


def peak_flops(pk: dict, dtype: str) -> float | None:
    f = (pk.get("flops") or {}).get(dtype) or {}
    return f.get("flops_per_s")


def vendor_ceiling(pk: dict, dtype: str) -> float | None:
    f = (pk.get("vendor_ceiling") or {}).get(dtype) or {}
    return f.get("flops_per_s")


def peak_bandwidth(pk: dict) -> float | None:
    return (pk.get("bandwidth") or {}).get("bytes_per_s")


def device_problem(dev: str) -> str | None:
    """Why `dev` cannot be used on this machine (not a device torch knows, or none present), else None.
    One line, for usage errors of the CLI and the pytest plugin."""
    import torch

    try:
        kind = torch.device(dev).type
    except (RuntimeError, ValueError, TypeError):
        return f"{dev!r} is not a device torch knows (e.g. cpu, cuda, cuda:1)"
    if kind == "cpu":
        return None
    avail = getattr(getattr(torch, kind, None), "is_available", None)
    if avail is None or not avail():
        present = ["cpu"] + [k for k in ("cuda", "xpu", "mps")
                             if getattr(getattr(torch, k, None), "is_available", lambda: False)()]
        return f"no {kind} device on this machine (torch {torch.__version__}); present: {', '.join(present)}"
    return None

