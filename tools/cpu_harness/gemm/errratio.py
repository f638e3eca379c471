import torch, pykernels._C as C
torch.manual_seed(1)
for dt in (torch.float32, torch.bfloat16):
    for (M, N, K) in [(1,4096,4096),(2,4096,4096),(4,4096,4096),(5,4096,4096),(16,4096,4096),(64,1000,4096),(127,1025,1023),(1000,1000,1000),(2048,2048,2048),(3,11008,4096),(4,4096,11008)]:
        a = (torch.randn(M, K) + 0.5).to(dt); b = (torch.randn(K, N) - 0.25).to(dt); c = torch.empty(M, N, dtype=dt)
        C.gemm(a.data_ptr(), b.data_ptr(), c.data_ptr(), M, N, K, 0 if dt == torch.float32 else 2)
        ref = a.double() @ b.double()
        e = (c.double() - ref).abs().max().item(); te = ((a @ b).double() - ref).abs().max().item()
        print(f"{str(dt)[6:]:8s} {M:5d} {N:5d} {K:5d}  err {e:.3e}  torch {te:.3e}  ratio {e/te:.2f}")
