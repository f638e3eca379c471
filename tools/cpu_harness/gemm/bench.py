# Ratio native/torch, same process, 2 threads, interleaved repetitions, medians.
import torch, time, statistics, sys
import pykernels._C as C
torch.set_num_threads(2)
def med(fn, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter_ns(); fn(); ts.append(time.perf_counter_ns() - t0)
    return statistics.median(ts)
cases = [(torch.float32, 2048, 2048, 2048), (torch.float32, 1024, 1024, 1024),
         (torch.bfloat16, 2048, 2048, 2048),
         (torch.float32, 1, 4096, 4096), (torch.float32, 4, 4096, 4096), (torch.float32, 16, 4096, 4096),
         (torch.bfloat16, 1, 4096, 4096), (torch.bfloat16, 4, 4096, 4096), (torch.bfloat16, 16, 4096, 4096)]
if len(sys.argv) > 1:
    sel = sys.argv[1].split(',')
    cases = [c for i, c in enumerate(cases) if str(i) in sel]
rounds = 5
for dt, M, N, K in cases:
    a = torch.randn(M, K).to(dt); b = torch.randn(K, N).to(dt); c = torch.empty(M, N, dtype=dt)
    code = 0 if dt == torch.float32 else 2
    nat = lambda: C.gemm(a.data_ptr(), b.data_ptr(), c.data_ptr(), M, N, K, code)
    tor = lambda: torch.matmul(a, b, out=c)
    reps = 3 if M * N * K >= 2048**3 else 10
    for f in (nat, tor): f(); f()
    tn, tt = [], []
    for _ in range(rounds):   # interleave so that background load hits both alike
        tn.append(med(nat, reps)); tt.append(med(tor, reps))
    n, t = statistics.median(tn), statistics.median(tt)
    fl = 2 * M * N * K
    print(f"{str(dt)[6:]:8s} M={M:5d} N={N} K={K}: native {n/1e6:8.3f} ms {fl/n:7.1f} GF/s | torch {t/1e6:8.3f} ms {fl/t:7.1f} GF/s | ratio torch/native time = {t/n:5.2f}", flush=True)
