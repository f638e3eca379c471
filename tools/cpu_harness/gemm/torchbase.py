import torch, time, statistics
torch.set_num_threads(2)
def t(fn, reps=7):
    fn(); fn()
    ts=[]
    for _ in range(reps):
        t0=time.perf_counter_ns(); fn(); ts.append(time.perf_counter_ns()-t0)
    return statistics.median(ts)/1e9
for dt in [torch.float32, torch.bfloat16]:
    for (M,N,K) in [(2048,2048,2048),(1024,1024,1024),(1,4096,4096),(4,4096,4096),(16,4096,4096)]:
        a=torch.randn(M,K).to(dt); b=torch.randn(K,N).to(dt)
        s=t(lambda: a@b)
        print(dt, M,N,K, f"{s*1e3:.3f} ms {2*M*N*K/s/1e9:.1f} GFLOP/s {(K*N*a.element_size())/s/1e9:.1f} GB/s(B)")
