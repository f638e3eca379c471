import torch, sys, itertools
import pykernels._C as C
torch.manual_seed(0)
sizes = [1, 7, 63, 64, 65, 127, 1000, 1023, 1025]
def run(M, N, K, dt):
    a = (torch.randn(M, K) + 0.1).to(dt); b = (torch.randn(K, N) - 0.05).to(dt)
    c = torch.full((M, N), float('nan')).to(dt)
    C.gemm(a.data_ptr(), b.data_ptr(), c.data_ptr(), M, N, K, 0 if dt == torch.float32 else 2)
    ref = a.double() @ b.double()
    err = (c.double() - ref).abs().max().item()
    terr = ((a @ b).double() - ref).abs().max().item()
    scale = ref.abs().max().item() + 1e-30
    ok = err <= 2 * terr + (1e-5 if dt == torch.float32 else 1e-3) * scale and torch.isfinite(c).all()
    return ok, err, terr
shapes = []
if len(sys.argv) > 1 and sys.argv[1] == 'full':
    shapes = list(itertools.product(sizes, sizes, sizes))
else:
    pick = [1, 2, 3, 4, 7, 16, 64, 65, 127, 1025]
    shapes = list(itertools.product(pick, [1, 7, 63, 65, 1000], [1, 63, 65, 1023]))
shapes += [(2, 4096, 4096), (16, 4096, 4096), (5, 100, 3000), (300, 300, 1500), (257, 1000, 1025), (15, 33, 513)]
bad = 0
for dt in [torch.float32, torch.bfloat16]:
    for (M, N, K) in shapes:
        ok, err, terr = run(M, N, K, dt)
        if not ok:
            bad += 1; print('FAIL', dt, M, N, K, err, terr)
print('failures:', bad, 'of', 2 * len(shapes))
