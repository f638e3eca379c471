# Final ratio table: native (pykernels._C.gemm) vs torch.matmul, same process, interleaved rounds.
# usage: python final_bench.py [threads] [rounds]
import torch, time, statistics, sys
import pykernels._C as C
nthreads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
torch.set_num_threads(nthreads)
def med(fn, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter_ns(); fn(); ts.append(time.perf_counter_ns() - t0)
    return statistics.median(ts)
cases = [(torch.float32, 2048, 2048, 2048), (torch.float32, 1024, 1024, 1024), (torch.bfloat16, 2048, 2048, 2048)]
cases += [(dt, m, 4096, 4096) for dt in (torch.float32, torch.bfloat16) for m in (1, 4, 16)]
print(f"threads={nthreads} rounds={rounds} load={open('/proc/loadavg').read().split()[:3]}")
for dt, M, N, K in cases:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(M, K, generator=g).to(dt); b = torch.randn(K, N, generator=g).to(dt)
    c = torch.empty(M, N, dtype=dt); ct = torch.empty(M, N, dtype=dt)
    code = 0 if dt == torch.float32 else 2
    nat = lambda: C.gemm(a.data_ptr(), b.data_ptr(), c.data_ptr(), M, N, K, code)
    tor = lambda: torch.matmul(a, b, out=ct)
    reps = 3 if M * N * K >= 2048**3 else (5 if M * N * K >= 1024**3 else 20)
    for f in (nat, tor): f(); f()
    ratios, tn, tt = [], [], []
    for _ in range(rounds):   # interleaved: background load hits both alike
        n = med(nat, reps); t = med(tor, reps)
        tn.append(n); tt.append(t); ratios.append(t / n)
    ref = a.double() @ b.double()
    err = (c.double() - ref).abs().max().item(); terr = (ct.double() - ref).abs().max().item()
    fl = 2 * M * N * K
    n, t = statistics.median(tn), statistics.median(tt)
    print(f"{str(dt)[6:]:8s} M={M:4d} N={N} K={K}: native {n/1e6:8.3f} ms {fl/n:6.1f} GF/s | torch {t/1e6:8.3f} ms {fl/t:6.1f} GF/s"
          f" | native/torch throughput: median {statistics.median(ratios):5.2f} (min {min(ratios):4.2f} max {max(ratios):4.2f}) | maxerr {err:.2e} torch {terr:.2e}", flush=True)
