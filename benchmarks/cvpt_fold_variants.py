"""CVPT on the Triton backend: the fused folded-cross-attention kernel vs the same fold as
cuBLAS products + softmax (svpt.reference.folded_cross_attention) vs the plain path, against
the no-prompt floor (ViT-B/16, batch 128, bf16 autocast, training step; median of 15 steps),
for M from 10 to 50 (the fold pays in multiply-adds up to M = 46: svpt.methods.cvpt.fold_pays).

    PYTHONPATH=. python benchmarks/cvpt_fold_variants.py
"""
import statistics, sys, torch
sys.path.insert(0, "."); sys.path.insert(0, "benchmarks")
import svpt, svpt.methods.cvpt, fast_path_step as fps
from svpt import reference
import svpt_kernels.triton as tri
from baselines import NoPromptFloor
torch.backends.cuda.matmul.allow_tf32 = True
svpt.methods.cvpt.fold_pays = lambda block, num_prompts: True  # measure the fold beyond its break-even too
fused_op = tri.folded_cross_attention
images = torch.randn(128, 3, 224, 224, device="cuda"); labels = torch.randint(0, 100, (128,), device="cuda")
rows = {}
def mk(name, factory, fast, op):
    m = factory().cuda(); rows[name] = dict(step=fps.make_step(m, images, labels), fast=fast, op=op, t=[])
mk("floor", lambda: NoPromptFloor(fps.vit()), True, fused_op)
for M in (10, 20, 40, 50):  # fold_pays: up to M = 46 for ViT-B/16
    mk(f"cvpt{M} fused-kernel", lambda: svpt.prompt(fps.vit(), "cvpt", M), True, fused_op)
    mk(f"cvpt{M} cublas-composition", lambda: svpt.prompt(fps.vit(), "cvpt", M), True, reference.folded_cross_attention)
    mk(f"cvpt{M} plain", lambda: svpt.prompt(fps.vit(), "cvpt", M), False, fused_op)
def run(r, timed):
    tri.folded_cross_attention = r["op"]
    with svpt.backend("triton"), svpt.backends.fast_paths(r["fast"]):
        return fps.timed(r["step"]) if timed else r["step"]()
for r in rows.values():
    for _ in range(4): run(r, False)
for _ in range(15):
    for r in rows.values(): r["t"].append(run(r, True))
floor = statistics.median(rows["floor"]["t"])
for n, r in rows.items():
    med = statistics.median(r["t"]); print(f"{n:28s} {med:8.2f} ms  x{med/floor:.3f}  (min {min(r['t']):.2f} max {max(r['t']):.2f})")
