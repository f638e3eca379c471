import torch, time, statistics, sys
import pykernels._C as C
torch.set_num_threads(2)
def med(fn, reps):
    ts=[]
    for _ in range(reps):
        t0=time.perf_counter_ns(); fn(); ts.append(time.perf_counter_ns()-t0)
    return statistics.median(ts)
print("load", open('/proc/loadavg').read().split()[:3])
for dt in (torch.float32, torch.bfloat16):
  for M in (1,4,16):
    K=N=4096
    a=torch.randn(M,K).to(dt); b=torch.randn(K,N).to(dt); c=torch.empty(M,N,dtype=dt); ct=torch.empty(M,N,dtype=dt)
    code=0 if dt==torch.float32 else 2
    nat=lambda: C.gemm(a.data_ptr(), b.data_ptr(), c.data_ptr(), M,N,K,code)
    tor=lambda: torch.matmul(a,b,out=ct)
    src=torch.randn(K*N//(1 if dt==torch.float32 else 2)); dst=torch.empty_like(src)
    cp=lambda: dst.copy_(src)
    for f in (nat,tor,cp): f();f()
    rs=[];tn=[];tt=[];tc=[]
    for _ in range(int(sys.argv[1]) if len(sys.argv)>1 else 5):
        n=med(nat,20); t=med(tor,20); x=med(cp,20); tn.append(n); tt.append(t); tc.append(x); rs.append(t/n)
    n=statistics.median(tn); t=statistics.median(tt); x=statistics.median(tc)
    byt=K*N*b.element_size()
    cbw=2*src.numel()*4/x
    print(f"{dt} M={M}: nat {n/1e6:.3f} ms ({byt/n:.1f} GB/s) torch {t/1e6:.3f} ms ratio med {statistics.median(rs):.2f} min {min(rs):.2f} max {max(rs):.2f} | copy {cbw:.1f} GB/s(r+w) -> nat {100*byt/n/cbw:.0f}%")
