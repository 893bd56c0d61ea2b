"""Bisect the fused region that makes NaN/inf gradients on the GPU (Fusion(fuel=k))."""
import torch, lightning_thunder as lt
from lightning_thunder.plugins import Fusion
from tests.gpu.test_fusion_cuda import _rmsnorm_mlp

torch.manual_seed(0)
shapes = ((8192, 2048), (2048,), (8192, 2048), (8192, 2048))
xs = [torch.randn(s, device="cuda", dtype=torch.bfloat16) for s in shapes]
cot = torch.randn(8192, 2048, device="cuda", dtype=torch.bfloat16)

def run(fuel):
    torch._dynamo.reset()
    ins = [x.clone().requires_grad_() for x in xs]
    cf = lt.compile(_rmsnorm_mlp, plugins=[Fusion(fuel=fuel)])
    out = cf(*ins)
    out.backward(cot)
    torch.cuda.synchronize()
    bad = [i for i, x in enumerate(ins) if not torch.isfinite(x.grad).all()]
    return bad, cf, ins

for fuel in range(0, 8):
    bad, cf, ins = run(fuel)
    n = lt.compile_stats(cf).fusion_regions
    print("fuel", fuel, "regions", n, "non-finite grads of inputs", bad, flush=True)
    if bad:
        bw = lt.last_backward_traces(cf)[-1]
        print(bw)
        for k, v in lt.kernel_sources(cf).items():
            print("=====", k)
            print(v.split("@triton.jit\ndef fused")[-1])
        g = ins[1].grad.float()
        print("w.grad nonfinite count", (~torch.isfinite(g)).sum().item(), "max", g.abs().max().item())
        break
    if fuel >= n:
        break
