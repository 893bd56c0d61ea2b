import torch, time
import torch.nn.functional as F
from torch.profiler import profile, ProfilerActivity
from torch.utils._python_dispatch import TorchDispatchMode
torch.manual_seed(0)
dev = "cuda"
B, H, G, T, D = 4, 32, 8, 2048, 64
q = torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(B, G, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(B, G, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
go = torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16)
class Ops(TorchDispatchMode):
    def __init__(s): super().__init__(); s.ops=[]
    def __torch_dispatch__(s, func, types, args=(), kwargs=None):
        s.ops.append(str(func)); return func(*args, **(kwargs or {}))
def expanded():
    ke = k.unsqueeze(2).expand(B, G, H // G, T, D).reshape(B, H, T, D)
    ve = v.unsqueeze(2).expand(B, G, H // G, T, D).reshape(B, H, T, D)
    return F.scaled_dot_product_attention(q, ke, ve, is_causal=True)
def gqa():
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
res = {}
for name, fn in (("expanded", expanded), ("gqa", gqa)):
    try:
        with Ops() as m:
            o = fn(); o.backward(go)
        grads = [t.grad.clone() for t in (q, k, v)]
        for t in (q, k, v): t.grad = None
        res[name] = (o.detach(), grads)
        print(name, "ops:", [x for x in m.ops if "attention" in x or "clone" in x or "sum" in x or "copy" in x])
        def run():
            o = fn(); o.backward(go)
        for _ in range(3): run()
        torch.cuda.synchronize(); t0 = time.perf_counter()
        for _ in range(20): run()
        torch.cuda.synchronize(); print(name, "fwd+bwd ms", (time.perf_counter() - t0) / 20 * 1e3)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run(); torch.cuda.synchronize()
        ks = [e.name[:70] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        print(name, len(ks), "kernels:", sorted(set(ks)))
        for t in (q, k, v): t.grad = None
    except Exception as e:
        print(name, "FAILED", type(e).__name__, str(e)[:300])
if len(res) == 2:
    (o1, g1), (o2, g2) = res["expanded"], res["gqa"]
    print("max diff out", (o1 - o2).abs().max().item(), "grads", [(a - b).abs().max().item() for a, b in zip(g1, g2)])
