"""Type stub of the private extension pykernels._C (csrc/bindings.cpp). Use the package API instead.

Pointers are integer addresses (tensor.data_ptr()); dtype codes and device codes are those of
pykernels/backends/native.py; `stream` is a CUDA stream handle (0 on CPU). Every function checks what it
can itself (null pointers, sizes >= 1 and without overflow, dtype, device, GQA, scale, and the host-side
context lengths and block table) and raises ValueError naming the argument.
"""

has_cuda: bool

def gemm(a: int, b: int, c: int, M: int, N: int, K: int, dtype: int, device: int = 0, stream: int = 0,
         transb: bool = False) -> None: ...
def attention(q: int, k: int, v: int, o: int, B: int, Hq: int, Hkv: int, S: int, D: int, scale: float,
              causal: bool, dtype: int, device: int = 0, stream: int = 0) -> None: ...
def decode(q: int, k_cache: int, v_cache: int, o: int, context_lens: int, block_table: int, B: int, Hq: int,
           Hkv: int, D: int, num_blocks: int, block_size: int, max_blocks: int, scale: float, dtype: int,
           device: int = 0, stream: int = 0) -> None: ...
def cpu_features() -> dict[str, bool]: ...
def build_info() -> dict[str, object]: ...
