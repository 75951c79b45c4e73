"""GPU parity of the triton backend against eager, both against float64 eager (ViT-B/16, M=50 prompts, batch 8):
outputs and the worst trainable gradient per method, fp32 (no tf32) and bf16 autocast; then torch.compile(fullgraph=True)
of svpt, cvpt and vpt-deep.   PYTHONPATH=. python benchmarks/gpu_parity.py [number of method cases]
"""
import sys, time, torch, timm, svpt
from svpt import backends
torch.backends.cuda.matmul.allow_tf32 = False; torch.backends.cudnn.allow_tf32 = False
def rel(a, b): return ((a.double()-b.double()).norm()/b.double().norm().clamp_min(1e-30)).item()
def model(method, m, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    v = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)
    svpt.prompt(v, method, m, **kw)
    with torch.no_grad():
        if method == "svpt":
            v.prompter.da.weight.normal_(0, 0.02); v.prompter.ae.scale.fill_(0.3)
    return v.cuda().to(dtype)
def run(v, x, be, autocast):
    with svpt.backend(be), backends.trace() as log, torch.autocast("cuda", torch.bfloat16, enabled=autocast):
        out = v(x)
    (out.float() * torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)).sum().backward()
    g = {n: p.grad.detach().clone() for n, p in v.named_parameters() if p.requires_grad}
    return out.detach(), g, sorted(set(log))
x = torch.randn(8, 3, 224, 224, device="cuda")
CASES = [("svpt", 50, {}), ("svpt", 50, {"ae_source": "prompt"}), ("vpt-deep", 50, {}), ("cvpt", 10, {}), ("vpt-shallow", 50, {})]
for method, m, kw in CASES[: int(sys.argv[1]) if len(sys.argv) > 1 else None]:
    ref = run(model(method, m, torch.float64, **kw), x.double(), "eager", False)
    for mode in ("fp32", "bf16"):
        ac = mode == "bf16"
        e = run(model(method, m, **kw), x, "eager", ac); t = run(model(method, m, **kw), x, "triton", ac)
        eo, to = rel(e[0], ref[0]), rel(t[0], ref[0])
        worst = max(((rel(t[1][n], ref[1][n]), rel(e[1][n], ref[1][n]), n) for n in ref[1]), key=lambda r: r[0] / max(r[1], 1e-12))
        print(f"{method:<11} {str(kw):<24} {mode}: out triton {to:.2e} eager {eo:.2e} | worst grad {worst[2]} triton {worst[0]:.2e} eager {worst[1]:.2e} | {t[2]}", flush=True)
# compile fullgraph
v = model("svpt", 50)
def f(x):
    with torch.autocast("cuda", torch.bfloat16):
        return v(x).float().square().sum()
with svpt.backend("triton"):
    for method, m in (("svpt", 50), ("cvpt", 10), ("vpt-deep", 50)):
        v = model(method, m); torch._dynamo.reset()
        t0 = time.time(); c = torch.compile(f, fullgraph=True); l = c(x); l.backward(); print(f"compile fullgraph {method} ok", float(l), float(f(x)), f"{time.time()-t0:.0f}s", flush=True)
