# Final ratio table: native (pykernels._C.gemm) vs torch.matmul, same process, interleaved rounds.
# usage: python final_bench2.py [threads] [rounds]
# v7: also a copy bandwidth (64 MB -> 64 MB, torch copy_, bytes read + written) and a read bandwidth
# (torch.sum over 64 MB) timed in the same rounds for the small-M (bandwidth-bound) cases.
import torch, time, statistics, sys, os, multiprocessing as mp
def busy(stop):   # BUSY=n: n pure-Python spinning processes beside the benchmark (a loaded machine)
    x = 0
    while not stop.is_set():
        for i in range(100000): x += i
import pykernels._C as C
nthreads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
torch.set_num_threads(nthreads)
if __name__ == "__main__" and int(os.environ.get("BUSY", "0")):
    _stop = mp.Event(); _ps = [mp.Process(target=busy, args=(_stop,), daemon=True) for _ in range(int(os.environ["BUSY"]))]
    for _p in _ps: _p.start()
    import atexit; atexit.register(_stop.set)
def med(fn, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter_ns(); fn(); ts.append(time.perf_counter_ns() - t0)
    return statistics.median(ts)
cases = [(torch.float32, 2048, 2048, 2048), (torch.float32, 1024, 1024, 1024), (torch.bfloat16, 2048, 2048, 2048)]
cases += [(dt, m, 4096, 4096) for dt in (torch.float32, torch.bfloat16) for m in (1, 4, 16)]
print(f"threads={nthreads} rounds={rounds} busy={os.environ.get('BUSY', '0')} load={open('/proc/loadavg').read().split()[:3]}")
for dt, M, N, K in cases:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(M, K, generator=g).to(dt); b = torch.randn(K, N, generator=g).to(dt)
    c = torch.empty(M, N, dtype=dt); ct = torch.empty(M, N, dtype=dt)
    code = 0 if dt == torch.float32 else 2
    nat = lambda: C.gemm(a.data_ptr(), b.data_ptr(), c.data_ptr(), M, N, K, code)
    tor = lambda: torch.matmul(a, b, out=ct)
    reps = 3 if M * N * K >= 2048**3 else (5 if M * N * K >= 1024**3 else 20)
    small = M <= 16
    src = torch.randn(16 << 20); dst = torch.empty_like(src)   # 64 MB each, twice the L3
    cp = lambda: dst.copy_(src)
    rd = lambda: src.sum()
    for f in (nat, tor, cp, rd): f(); f()
    ratios, tn, tt, tc, tr = [], [], [], [], []
    for _ in range(rounds):   # interleaved: background load hits both alike
        n = med(nat, reps); t = med(tor, reps)
        tn.append(n); tt.append(t); ratios.append(t / n)
        if small: tc.append(med(cp, reps)); tr.append(med(rd, reps))
    ref = a.double() @ b.double()
    err = (c.double() - ref).abs().max().item(); terr = (ct.double() - ref).abs().max().item()
    fl = 2 * M * N * K
    n, t = statistics.median(tn), statistics.median(tt)
    print(f"{str(dt)[6:]:8s} M={M:4d} N={N} K={K}: native {n/1e6:8.3f} ms {fl/n:6.1f} GF/s | torch {t/1e6:8.3f} ms {fl/t:6.1f} GF/s"
          f" | native/torch throughput: median {statistics.median(ratios):5.2f} (min {min(ratios):4.2f} max {max(ratios):4.2f}) | maxerr {err:.2e} torch {terr:.2e}", flush=True)
    if small:
        bb = K * N * b.element_size()   # bytes of B: the traffic of a GEMV-like call
        cbw = 2 * src.numel() * 4 / statistics.median(tc); rbw = src.numel() * 4 / statistics.median(tr)
        print(f"         B stream: native {bb/n:5.1f} GB/s, torch {bb/t:5.1f} GB/s | copy {cbw:5.1f} GB/s (read+write), sum {rbw:5.1f} GB/s (read)"
              f" | native = {100*bb/n/cbw:4.0f}% of copy, {100*bb/n/rbw:4.0f}% of read", flush=True)
