"""Type stub of the private extension pykernels._C (csrc/bindings.cpp). Use the package API instead.

Pointers are integer addresses (tensor.data_ptr()); dtype codes and device codes are those of
pykernels/backends/native.py; `stream` is a CUDA stream handle (0 on CPU). Every function checks what it
can itself (null pointers, sizes >= 1 and without overflow, dtype, device, GQA, scale, and the host-side
context lengths and block table) and raises ValueError naming the argument.
"""

from collections.abc import Callable
from typing import Any

has_cuda: bool

def gemm(a: int, b: int, c: int, M: int, N: int, K: int, dtype: int, device: int = 0, stream: int = 0,
         transb: bool = False) -> None: ...
def attention(q: int, k: int, v: int, o: int, B: int, Hq: int, Hkv: int, S: int, D: int, scale: float,
              causal: bool, dtype: int, device: int = 0, stream: int = 0) -> None: ...
def decode(q: int, k_cache: int, v_cache: int, o: int, context_lens: int, block_table: int, B: int, Hq: int,
           Hkv: int, D: int, num_blocks: int, block_size: int, max_blocks: int, scale: float, dtype: int,
           device: int = 0, stream: int = 0) -> None: ...
# Prepared CPU calls (what pk.prepare returns for the native backend on CPU): the same checks once, then a
# zero-argument function that runs the kernel and returns `out`; `keep` holds the operands alive.
def prepare_gemm(a: int, b: int, c: int, M: int, N: int, K: int, dtype: int, out: object,
                 keep: object, transb: bool = False) -> Callable[[], Any]: ...
def prepare_attention(q: int, k: int, v: int, o: int, B: int, Hq: int, Hkv: int, S: int, D: int, scale: float,
                      causal: bool, dtype: int, out: object, keep: object) -> Callable[[], Any]: ...
def prepare_decode(q: int, k_cache: int, v_cache: int, o: int, context_lens: int, block_table: int, B: int,
                   Hq: int, Hkv: int, D: int, num_blocks: int, block_size: int, max_blocks: int, scale: float,
                   dtype: int, out: object, keep: object) -> Callable[[], Any]: ...
def cpu_features() -> dict[str, bool | str]: ...  # ISA flags; bf16_dot_used / bf16_dot_source (PYKERNELS_BF16_DOT); stream_prefetch / _source; stream_prefetch_near / _source; stream_prefetch_distance / _source; gemv_streams / _source; paged_step / _source
def evict_cpu(ptr: int, nbytes: int) -> bool: ...  # clflush [ptr, ptr + nbytes); False off x86-64 (timing.evict)
def build_info() -> dict[str, object]: ...

# Hardware peak probes (csrc/cpu/probes.cpp, csrc/cuda/probes.cu; the CUDA ones are unverified on a GPU).
# A kind that is unknown or does not run here, threads outside 1..1024, seconds outside (0, 60], nbytes below
# 4096 or above half the physical memory (all arrays together), reps outside 1..1000: ValueError naming it.
# The CUDA probes raise RuntimeError when the extension was built without CUDA.
def probe_kinds() -> dict[str, object]: ...
def probe_compute(kind: str, threads: int | None = None, seconds: float = 0.3) -> dict[str, object]: ...
def probe_memory(kind: str, nbytes: int | None = None, threads: int | None = None, reps: int = 5) -> dict[str, object]: ...
def probe_clock(threads: int | None = None) -> dict[str, object]: ...

class ReadPass:  # the "read" probe over an array allocated once; run(): one pass, wall seconds
    nbytes: int
    def __init__(self, nbytes: int | None = None, threads: int | None = None) -> None: ...
    def run(self) -> float: ...

class ComputePass:  # a compute probe's loop with fixed work (~seconds per run); run(): one run, wall seconds
    kind: str
    threads: int
    flop: float  # the work of one run, all threads
    def __init__(self, kind: str, threads: int | None = None, seconds: float = 0.01) -> None: ...
    def run(self) -> float: ...
def probe_cuda_compute(kind: str, seconds: float = 0.3) -> dict[str, object]: ...
def probe_cuda_memory(kind: str, nbytes: int | None = None, reps: int = 5) -> dict[str, object]: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def cpu_isa() -> str: ...  # active CPU ISA tier: "amx", "avx512", "avx2" or "portable" (PYKERNELS_CPU_ISA at load)
def decode_cpu_isa(D: int) -> str: ...  # the tier whose code runs a CPU decode of head dim D: cpu_isa() for 64 / 128, else "portable"
def attention_cpu_isa(D: int, dtype: int) -> str: ...  # likewise for attention (dtype code): 32, 64, .., 256; bf16 on amx any D <= 256
def cpu_isas() -> list[str]: ...  # the tiers this CPU can run, best first
def set_cpu_isa(name: str) -> None: ...  # ValueError naming `name` for an unknown or unsupported tier
def set_cpu_prefetch(level: str, source: str | None = None) -> None: ...  # "l1" / "l2" / "l1-ungrouped" / "l1-grouped": where the decode kernels prefetch K/V (PYKERNELS_CPU_PREFETCH); source: the reason cpu_features() reports
def set_cpu_prefetch_near(on: bool, source: str | None = None) -> None: ...  # a second, nearer L1 prefetch of each K/V line (PYKERNELS_CPU_PREFETCH_NEAR)
def set_cpu_gemv_streams(rows: int, source: str | None = None) -> None: ...  # rows of B per step of a one-row GEMM, 4 or 8 (PYKERNELS_CPU_GEMV_STREAMS)
def set_cpu_paged_step(tokens: int, source: str | None = None) -> None: ...  # tokens per step of one kv head, AVX-512 decode on a paged cache: 16, 32, 64 or 128 (PYKERNELS_CPU_PAGED_STEP)
def set_cpu_prefetch_distance(nbytes: int, source: str | None = None) -> None: ...  # how far ahead decode prefetches K/V, a multiple of 1024 in 1024..65536 (PYKERNELS_CPU_PREFETCH_DISTANCE)
def cpu_caches() -> dict[str, int]: ...  # l1d, l2 (per core), l3 bytes, l3_sharing: what the blocking uses
