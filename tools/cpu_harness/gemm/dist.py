import torch, time, statistics, sys, multiprocessing as mp, os
import pykernels._C as C
def busy(stop):
    x = 0
    while not stop.is_set():
        for i in range(100000): x += i
if __name__ == "__main__":
    nb = int(sys.argv[1]); M=int(sys.argv[2]); dt=torch.float32 if sys.argv[3]=='f32' else torch.bfloat16
    torch.set_num_threads(int(os.environ.get('NT','2')))
    stop = mp.Event(); ps = [mp.Process(target=busy, args=(stop,)) for _ in range(nb)]
    for p in ps: p.start()
    time.sleep(0.5)
    try:
        K=N=4096
        a=torch.randn(M,K).to(dt); b=torch.randn(K,N).to(dt); c=torch.empty(M,N,dtype=dt); ct=torch.empty(M,N,dtype=dt)
        code=0 if dt==torch.float32 else 2
        nat=lambda: C.gemm(a.data_ptr(), b.data_ptr(), c.data_ptr(), M,N,K,code)
        tor=lambda: torch.matmul(a,b,out=ct)
        for name,f in (("nat",nat),("tor",tor),("nat",nat),("tor",tor)):
            ts=[]
            for _ in range(40):
                t0=time.perf_counter_ns(); f(); ts.append((time.perf_counter_ns()-t0)/1e6)
            print(name, " ".join(f"{x:.1f}" for x in ts), "| med %.2f"%statistics.median(ts), flush=True)
    finally:
        stop.set()
        for p in ps: p.join()
