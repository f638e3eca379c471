# fp32/bf16 small-M decode under artificial load: python m1load.py NBUSY ROUNDS [M...]
import torch, time, statistics, sys, multiprocessing as mp, os
import pykernels._C as C
def busy(stop):
    x = 0
    while not stop.is_set():
        for i in range(100000): x += i
if __name__ == "__main__":
    nb = int(sys.argv[1]); rounds = int(sys.argv[2]); Ms = [int(x) for x in sys.argv[3:]] or [1]
    torch.set_num_threads(2)
    NT=int(os.environ.get('NT','2'))
    stop = mp.Event(); ps = [mp.Process(target=busy, args=(stop,)) for _ in range(nb)]
    for p in ps: p.start()
    def med(fn, reps):
        ts=[]
        for _ in range(reps):
            t0=time.perf_counter_ns(); fn(); ts.append(time.perf_counter_ns()-t0)
        return statistics.median(ts)
    try:
        for dt in (torch.float32, torch.bfloat16):
          for M in Ms:
            K=N=4096
            a=torch.randn(M,K).to(dt); b=torch.randn(K,N).to(dt); c=torch.empty(M,N,dtype=dt); ct=torch.empty(M,N,dtype=dt)
            code=0 if dt==torch.float32 else 2
            nat=lambda: C.gemm(a.data_ptr(), b.data_ptr(), c.data_ptr(), M,N,K,code)
            tor=lambda: torch.matmul(a,b,out=ct)
            for f in (nat,tor): f();f()
            rs=[];tn=[];tt=[]
            for _ in range(rounds):
                torch.set_num_threads(NT); n=med(nat,20); torch.set_num_threads(2); t=med(tor,20); tn.append(n); tt.append(t); rs.append(t/n)
            print(f"busy={nb} {dt} M={M}: nat {statistics.median(tn)/1e6:.3f} ms torch {statistics.median(tt)/1e6:.3f} ms ratio med {statistics.median(rs):.2f} min {min(rs):.2f} max {max(rs):.2f}", flush=True)
    finally:
        stop.set()
        for p in ps: p.join()
