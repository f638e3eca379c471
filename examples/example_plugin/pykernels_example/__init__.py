"""An example pykernels backend plugin. A vendor's port looks the same: declare the backend, implement
the families it supports, and say when it is unavailable and why.

Every family is written with plain torch operations (explicit softmax, no fused kernels), so that the
example is short and runs on any device torch supports.
"""

from __future__ import annotations

import torch

from pykernels.backends import Backend

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class ExampleTorchBackend(Backend):
    name = "example_torch"
    tier = "abstraction"           # native | vendor | abstraction
    devices = ("cpu", "cuda")      # torch device types this backend runs on
    description = "example plugin: plain torch ops (pykernels/examples/example_plugin)"
    dtypes = {(dev, fam): _DTYPES for dev in ("cpu", "cuda") for fam in ("gemm", "attention", "decode")}

    def availability(self):
        # Return None when usable, else a reason, e.g. "libvendor.so not found" or "no XPU device".
        return None

    def supports(self, family, device_type, dtype, **shape):
        # The base class checks devices and dtypes; add shape limits of the port here (None = supported).
        return super().supports(family, device_type, dtype, **shape)

    # Inputs arrive validated by pykernels (contiguous, same device and dtype, shapes consistent,
    # `scale` a float); each method returns a new tensor in the input dtype.
    #
    # Optional: `def prepare(self, family, **kw)` gets the same validated arguments once and returns the
    # zero-argument callable that the harness times, after one-off work (copying the inputs into the port's
    # own buffers, compiling its kernels, allocating the output). Its cost is recorded as `prepare_s`. Without
    # it (as here) the callable is the family method itself.
    def gemm(self, a, b):
        return (a.float() @ b.float()).to(a.dtype)

    def linear(self, x, w):  # optional: pk.linear, w stored [N, K] as a model holds it
        return (x.float() @ w.float().t()).to(x.dtype)

    def attention(self, q, k, v, *, causal, scale):
        group = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, dim=1).float()
        v = v.repeat_interleave(group, dim=1).float()
        s = (q.float() @ k.transpose(-1, -2)) * scale
        if causal:
            S = q.shape[2]
            s = s.masked_fill(torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        return (torch.softmax(s, dim=-1) @ v).to(q.dtype)

    def decode(self, q, k_cache, v_cache, context_lens, block_table, *, scale):
        B, Hq, D = q.shape
        out = torch.empty_like(q)
        Hkv = k_cache.shape[1]
        for b in range(B):
            n = int(context_lens[b])
            if block_table is None:
                k, v = k_cache[b, :, :n], v_cache[b, :, :n]
            else:
                bs = k_cache.shape[2]
                blocks = block_table[b, : (n + bs - 1) // bs].long()
                k = k_cache[blocks].permute(1, 0, 2, 3).reshape(Hkv, -1, D)[:, :n]
                v = v_cache[blocks].permute(1, 0, 2, 3).reshape(Hkv, -1, D)[:, :n]
            qg = q[b].float().reshape(Hkv, Hq // Hkv, D)
            p = torch.softmax((qg @ k.float().transpose(-1, -2)) * scale, dim=-1)
            out[b] = (p @ v.float()).reshape(Hq, D).to(q.dtype)
        return out
