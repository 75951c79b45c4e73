"""The op tests' harness (tests/ops/, tests/test_properties.py, tests/gpu/): which cases exist, how a
case runs, and how it is judged.

Cases. A case is (backend, device, dtype). Which exist is read from ``svpt.backends.table()``, the
backends' own declarations: a backend's *own* cases are those it computes itself; the others are
hand-overs, tested once by each op module's routing test and never counted as a test of that
backend. A new declaration (say a C++ ``da_mix``) adds its cases without touching the tests.
Every run records ``svpt.backends.trace()``; a case asserts that the implementation it names is
the one that ran.

Judging (numerics.py, METHOD.md). The float64 reference (``svpt.reference``) runs on the inputs
and the cotangent rounded to the case's dtype, so what is measured is each implementation's own
error; outputs and every input gradient are compared. In 16-bit the yardstick is the eager backend
in the same dtype on the same device. Eager itself in 16-bit (the yardstick) is held to
``EAGER_ROUNDINGS`` unit roundoffs of its dtype, a sanity bound: it can fail (a value computed in
the wrong dtype, a wrong cast), but the 16-bit rule proper is about the other backends.

In-place ops (``da_mix``, ``ae_update``): the buffer is a non-leaf copy of a leaf (so gradients
reach the leaf), every run checks that the op returns that very buffer, and ``Case.rows`` names the
rows (dimension 1) each compared value is taken over: the rows the op writes. The untouched rows
are checked bit for bit by the op modules' own tests.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace

import pytest
import torch

import svpt
from svpt import backends, ops, reference

from numerics import LOW_PRECISION, bound, cotangent, flash_delta_moves, rel_err

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
BACKENDS = tuple(backends.describe())  # the selectable backends: eager, triton, cpp
EAGER_ROUNDINGS = 16  # eager's 16-bit errors measured up to 5 u (da.bias's gradient: a sum of B*M rounded terms)
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


# ------------------------------------------------------------------ which cases exist
def declared(op: str) -> list[dict]:
    """svpt.backends.table()'s rows for ``op`` on the devices of this machine."""
    return [row for row in backends.table(DEVICES) if row["op"] == op]


def interpreted(backend: str, device: str) -> bool:
    """Triton on CPU runs in its interpreter (tests/conftest.py): one program after the other, in
    numpy, so only tiny shapes."""
    return backend == "triton" and device == "cpu"


def own_cases(op: str, dtypes: tuple[torch.dtype, ...] | None = None, long: bool = False) -> list:
    """``pytest.param(backend, device, dtype)`` for every case a backend computes itself; without
    eager's float64 on CPU (the reference itself: each op module checks it against its definition);
    ``long``: only those fast enough for ViT-sized sequences (not the Triton interpreter)."""
    cases = []
    for row in declared(op):
        dtype = DTYPES[row["dtype"]]
        if row["runs"] != row["backend"] or (dtypes is not None and dtype not in dtypes):
            continue
        if (row["backend"], row["device"], dtype) == ("eager", "cpu", torch.float64):
            continue
        if long and interpreted(row["backend"], row["device"]):
            continue
        cases.append(pytest.param(row["backend"], row["device"], dtype,
                                  id=f"{row['backend']}-{row['device']}-{row['dtype']}"))
    return cases


def value_cases(op: str, shapes, long_shapes=()) -> list:
    """``pytest.param(backend, device, dtype, shape)``: every own case of ``op`` (:func:`own_cases`)
    at each of ``shapes``, and those fast enough at each of ``long_shapes``."""
    return [pytest.param(*case.values, shape, id=f"{case.id}-{shape}")
            for names, long in ((shapes, False), (long_shapes, True)) for case in own_cases(op, long=long)
            for shape in names]


def handed_over(op: str) -> list:
    """``pytest.param(row)`` for every declared hand-over of ``op``: the backend names another
    implementation (``row["runs"]``) and says why (``row["why"]``)."""
    return [pytest.param(row, id=f"{row['backend']}-{row['device']}-{row['dtype']}-to-{row['runs']}")
            for row in declared(op) if row["runs"] not in (row["backend"], "-")]


# ------------------------------------------------------------------ one call of an op
@dataclass
class Case:
    """One call of ``op``: the float64 values of its tensor inputs (in call order; ``None``: absent)
    and its other arguments.

    ``grads``: the inputs that get gradients. ``own_dtype``: inputs passed in the dtype they have
    (ae_update's float32 saliency). ``same``: inputs passed as another input itself (``residual``:
    ``x``). ``buffer``: the input written in place. ``rows``: for a compared value (``"out"`` or an
    input's name), the rows ``(start, stop)`` of dimension 1 it is compared over. ``autocast``: run
    the tested and the eager call under ``torch.autocast`` in that dtype (the reference without).
    ``layouts``: inputs passed in a memory layout of :func:`laid_out` (the model's q/k/v views are
    ``padded``). ``keywords``: inputs passed by name, after ``args``. ``norm_eps``: the op called with
    ``norm=(inputs["norm weight"], inputs["norm bias"], norm_eps)`` (:func:`with_norm`)."""
    op: str
    inputs: dict[str, torch.Tensor | None]
    args: tuple = ()
    grads: tuple[str, ...] = ()
    own_dtype: tuple[str, ...] = ()
    same: dict[str, str] = field(default_factory=dict)
    buffer: str | None = None
    rows: dict[str, tuple[int, int]] = field(default_factory=dict)
    autocast: torch.dtype | None = None
    layouts: dict[str, str] = field(default_factory=dict)
    keywords: tuple[str, ...] = ()
    norm_eps: float | None = None

    def call(self, fn, tensors: dict[str, torch.Tensor | None]):
        named = {name: tensors[self.same.get(name, name)] for name in self.inputs}
        norm = {}
        if self.norm_eps is not None:
            norm = {"norm": (named.pop("norm weight"), named.pop("norm bias"), self.norm_eps)}
        return fn(*[t for name, t in named.items() if name not in self.keywords], *self.args,
                  **{name: named[name] for name in self.keywords if name in named}, **norm)

    def precision(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the tested call computes in: autocast's, else the inputs'."""
        return self.autocast or dtype


def with_norm(case: Case, affine: bool = True) -> Case:
    """``case`` (given a residual: :func:`with_residual`) with ``norm``: the LayerNorm of the result, also
    compared with its gradient flowing back; ``affine``: with a weight and bias (frozen: no gradient)."""
    width = case.inputs["residual"].shape[-1]
    gen = torch.Generator().manual_seed(11)
    weight, bias = (1 + 0.5 * randn(gen, width), randn(gen, width)) if affine else (None, None)
    # next to a float32 residual stream, a float32 LayerNorm, as the model's under autocast
    own = ("norm weight", "norm bias") if "residual" in case.own_dtype else ()
    dtype = case.inputs["residual"].dtype
    weight, bias = (None if t is None else t.to(dtype) for t in (weight, bias))
    return replace(case, inputs={**case.inputs, "norm weight": weight, "norm bias": bias},
                   own_dtype=case.own_dtype + own, keywords=case.keywords + ("norm",), norm_eps=1e-5)


def layer_norm_tests(op: str, shapes, norm_case):
    """The two tests of a row-local op's ``norm=`` variant, for its module (test_da_mix.py, test_ae_update.py)
    to bind: ``norm_case(dtype, residual_dtype=None, shape=..., affine=True)`` makes its case."""
    @pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
    @pytest.mark.parametrize("backend,device,dtype,shape", value_cases(op, shapes))
    def test_with_the_layer_norm_of_the_sum(backend, device, dtype, shape, affine):
        """With ``norm``: (out, LayerNorm(out)), where a backend may fuse add, row update and LayerNorm;
        both outputs and every gradient, the LayerNorm's gradient flowing back through the row update."""
        check(norm_case(dtype, None, shape, affine), backend, device, dtype)

    @pytest.mark.parametrize("backend,device,dtype", own_cases(op, dtypes=(torch.float16, torch.bfloat16)))
    def test_with_the_layer_norm_on_a_float32_residual_next_to_a_16bit_branch(backend, device, dtype):
        """The model's case under autocast, with the block's float32 LayerNorm after the op."""
        check(norm_case(dtype, torch.float32), backend, device, dtype)

    return test_with_the_layer_norm_of_the_sum, test_with_the_layer_norm_on_a_float32_residual_next_to_a_16bit_branch


def with_residual(case: Case, dtype: torch.dtype | None = None) -> Case:
    """``case`` of an in-place row-local op given a ``residual`` (ops.ae_update): the op on
    ``residual + buffer``, a new buffer; every row of the result and of both gradients compared.
    ``dtype``: the residual in that dtype whatever the tested one (float32 next to a 16-bit branch,
    as the model's residual stream under autocast)."""
    branch = case.inputs[case.buffer]
    residual = randn(torch.Generator().manual_seed(7), *branch.shape)
    return replace(case, inputs={**case.inputs, "residual": residual if dtype is None else residual.to(dtype)},
                   grads=case.grads + ("residual",), own_dtype=case.own_dtype + (("residual",) if dtype else ()),
                   buffer=None, rows={}, layouts={}, keywords=("residual",))


@dataclass
class Run:
    """What one call gave: the main output, the gradients of ``Case.grads`` and the trace; ``normed``:
    the second output of an op called with ``norm`` (the LayerNorm of the first)."""
    out: torch.Tensor
    grads: dict[str, torch.Tensor]
    log: list[tuple[str, str]]
    normed: torch.Tensor | None = None

    def values(self, case: Case) -> dict[str, torch.Tensor]:
        """The compared values: the output(s) and each gradient, over ``case.rows`` where given."""
        named = {"out": self.out, **({} if self.normed is None else {"normed": self.normed}),
                 **{f"grad {name}": g for name, g in self.grads.items()}}
        out = {}
        for key, value in named.items():
            rows = case.rows.get(key.removeprefix("grad "))
            out[key] = value if rows is None else value[:, rows[0]:rows[1]]
        return out


def leaves(case: Case, device, dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
    """The inputs as fresh leaf tensors on ``device`` in ``dtype`` (``own_dtype`` ones in theirs),
    in their ``layouts``, with gradients where the case asks."""
    out = {}
    for name, value in case.inputs.items():
        if value is None:
            out[name] = None
            continue
        t = value.to(device, value.dtype if name in case.own_dtype else dtype, copy=True)
        if name in case.layouts and name != case.buffer:
            t = laid_out(t, case.layouts[name])
        out[name] = t.requires_grad_(name in case.grads)
    return out


LAYOUTS = ("contiguous", "padded", "every-other", "permuted")


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` (same values) in a memory layout: ``padded``: unit last stride, padded outer strides
    (the q/k/v views of a [B, T, 3, H, D] projection); ``every-other``: every other element of a
    wider buffer (no unit stride); ``permuted``: dense in reversed dimension order."""
    if layout == "padded" and t.dim() >= 2:
        wide = torch.zeros((*t.shape[:2], 3, *t.shape[2:]), dtype=t.dtype, device=t.device)
        view = wide[:, :, 1]
    elif layout == "every-other":
        wide = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype, device=t.device)
        view = wide[..., ::2]
    elif layout == "permuted" and t.dim() >= 2:
        order = list(range(t.dim()))[::-1]
        view = torch.empty_like(t.permute(order)).permute(order)
    else:
        return t
    view.copy_(t)
    return view


def rounded(case: Case, dtype: torch.dtype) -> Case:
    """``case`` with its inputs rounded to ``dtype`` (those of ``own_dtype`` to their own), as float64
    values: what the reference sees."""
    return replace(case, inputs={name: None if value is None else
                                 (value if name in case.own_dtype else value.to(dtype)).double()
                                 for name, value in case.inputs.items()})


def execute(case: Case, backend: str | None, device, dtype: torch.dtype, seed: int = 1,
            grad_out: torch.Tensor | None = None, provider=None) -> Run:
    """Run ``case`` in ``dtype`` on ``backend`` through svpt.ops (traced), or with ``backend=None``
    as the float64 reference (svpt.reference) on the values rounded to ``dtype``, or ``provider``
    (a function with the op's signature, e.g. svpt.sdpa's) called directly. Gradients for the
    cotangent ``grad_out``, by default a random one (numerics.cotangent) rounded to the precision
    the tested call computes in."""
    reference_run = backend is None and provider is None
    inputs = leaves(rounded(case, dtype), device, torch.float64) if reference_run else leaves(case, device, dtype)
    tensors = dict(inputs)
    if case.buffer is not None:  # written in place: a non-leaf copy, whose gradient reaches the leaf
        leaf = inputs[case.buffer]
        layout = case.layouts.get(case.buffer, "contiguous")
        tensors[case.buffer] = leaf.clone() if layout == "contiguous" else laid_out(leaf, layout)
    autocast = (torch.autocast(torch.device(device).type, dtype=case.autocast)
                if case.autocast and not reference_run else contextlib.nullcontext())
    selected = contextlib.nullcontext() if backend is None else svpt.backend(backend)
    fn = provider or getattr(reference if reference_run else ops, case.op)
    with selected, backends.trace() as log, autocast:
        out = case.call(fn, tensors)
    outs = out if isinstance(out, tuple) else (out,)  # (out, LayerNorm(out)) with norm=
    if case.buffer is not None:
        assert out is tensors[case.buffer], f"{case.op} must return the buffer it wrote in place"
    grads = {}
    if case.grads:
        cots = [(cotangent(o.shape, case.precision(dtype), seed + i) if grad_out is None or i else grad_out).to(o)
                for i, o in enumerate(outs)]
        grads = dict(zip(case.grads, torch.autograd.grad(outs, [inputs[n] for n in case.grads], cots)))
    return Run(outs[0].detach(), {n: g.detach() for n, g in grads.items()}, list(log),
               outs[1].detach() if len(outs) > 1 else None)


# ------------------------------------------------------------------ judging a case
def check(case: Case, backend: str, device, dtype: torch.dtype, floors=None, provider=None,
          zeros: bool = False) -> dict:
    """Run ``case`` on ``backend`` (or call ``provider``, named ``backend`` in messages) and assert
    METHOD.md's bound for the output and every gradient (numerics.bound). ``floors(case, want,
    dtype) -> {value: floor}``: an extra allowance, only FlashAttention's D term (:func:`flash_floors`).
    ``zeros``: a value whose reference is exactly zero (a softmax over one key gives q and k no
    gradient) is allowed, and held to 100 machine epsilons absolute (the inputs are O(1));
    otherwise such a value is an error of the case (its comparison could not fail).
    Returns {value: (error, eager's error)} for reports."""
    want = execute(case, None, device, dtype)
    got = execute(case, None if provider else backend, device, dtype, provider=provider)
    if provider is None:
        assert got.log == [(case.op, backend)], f"{backend} was to run {case.op}; the trace shows {got.log}"
    eager = got if backend == "eager" else execute(case, "eager", device, dtype)
    assert eager.log == [(case.op, "eager")], eager.log
    precision = case.precision(dtype)
    allowance = floors(case, want, dtype) if floors and precision in LOW_PRECISION else {}
    errors, bad = {}, []
    got_values, eager_values = got.values(case), eager.values(case)
    for key, w in want.values(case).items():
        g, e = got_values[key], eager_values[key]
        assert g.shape == w.shape and g.dtype == e.dtype, (key, g.shape, w.shape, g.dtype, e.dtype)
        coarser = min(precision, g.dtype, key=lambda d: torch.finfo(d).bits)  # a float32 saliency from float64
        if w.norm() == 0:
            assert zeros, f"{key}: the reference is zero, the comparison could not fail"
            if not g.abs().max() <= 100 * torch.finfo(coarser).eps:
                bad.append(f"{key}: {g.abs().max():.3g} where the reference is exactly zero")
            continue
        err, eager_err = rel_err(g, w), rel_err(e, w)
        if coarser in LOW_PRECISION and backend == "eager":
            limit = EAGER_ROUNDINGS * UNIT_ROUNDOFF[coarser]
        else:
            limit = bound(coarser, eager_err, allowance.get(key, 0.0))
        errors[key] = (err, eager_err)
        if not err <= limit:
            bad.append(f"{key}: {err:.3g} > {limit:.3g} (eager {eager_err:.3g})")
    assert not bad, f"{case.op} on {backend}/{device}/{dtype}: " + "; ".join(bad)
    return errors


# ------------------------------------------------------------------ helpers of the op modules
def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality, NaN equal to NaN (whatever its payload: CPU half-precision arithmetic
    re-encodes NaNs)."""
    if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.isnan(), b.isnan()):
        return False
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    a, b = (torch.where(t.isnan(), torch.zeros_like(t), t).contiguous().view(ints) for t in (a, b))
    return torch.equal(a, b)


def saved_bytes(fn) -> list[int]:
    """The storage sizes (bytes) of the tensors autograd saves for backward while ``fn()`` runs."""
    sizes = []

    def pack(t):
        sizes.append(t.untyped_storage().nbytes())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


def randn(gen: torch.Generator, *shape, std: float = 1.0) -> torch.Tensor:
    return std * torch.randn(shape, generator=gen, dtype=torch.float64)


def check_hand_over(case: Case, row: dict) -> None:
    """A declared hand-over (a row of :func:`handed_over`): under the row's backend the op runs the
    implementation the row names, and svpt.backends says why."""
    device, dtype = row["device"], DTYPES[row["dtype"]]
    run = execute(case, row["backend"], device, dtype)
    assert run.log == [(case.op, row["runs"])], run.log
    with svpt.backend(row["backend"]):
        impl = backends.implementation(case.op, torch.device(device), dtype)
    assert (impl.name, impl.why) == (row["runs"], row["why"]) and row["why"], (impl, row)


def poison(t: torch.Tensor, touched: torch.Tensor) -> torch.Tensor:
    """``t`` [B, T, ...] with NaN in every other row that ``touched`` [B, T] (bool) leaves out."""
    rows = torch.arange(t.shape[1]).expand(t.shape[0], -1)
    t = t.clone()
    t[~touched & (rows % 2 == 0)] = math.nan
    return t


def check_row_locality(case: Case, backend: str, device, dtype: torch.dtype, touched: torch.Tensor) -> None:
    """The in-place contract, forward and backward: ``touched`` [B, T] marks the rows of the buffer
    the op may read or write. With every other row NaN in the buffer and in the cotangent,
    the result's touched rows and every gradient inside them equal a clean run's bit for bit, and
    the other rows of the result and of the buffer's gradient are the input's and the cotangent's,
    bit for bit (nothing read there, nothing written)."""
    clean = execute(case, backend, device, dtype)
    buffer = case.inputs[case.buffer]
    dirty_case = replace(case, inputs={**case.inputs, case.buffer: poison(buffer, touched)})
    grad_out = poison(cotangent(buffer.shape, dtype), touched)
    dirty = execute(dirty_case, backend, device, dtype, grad_out=grad_out)
    assert dirty.log == clean.log == [(case.op, backend)], (dirty.log, clean.log)
    inside = touched.to(device)
    assert same_bits(dirty.out[inside], clean.out[inside]), "the untouched rows leaked into the result"
    assert same_bits(dirty.out[~inside], dirty_case.inputs[case.buffer].to(device, dtype)[~inside]), \
        "rows outside the op's were changed"
    for name, grad in dirty.grads.items():
        if name == case.buffer:
            assert same_bits(grad[inside], clean.grads[name][inside]), "the untouched rows' gradient leaked"
            assert same_bits(grad[~inside], grad_out.to(device, dtype)[~inside]), \
                "the gradient of the untouched rows did not pass through unchanged"
        else:
            assert same_bits(grad, clean.grads[name]), f"the untouched rows leaked into the gradient of {name}"


def check_saves_no_buffer(case: Case, backend: str, device, dtype: torch.dtype) -> None:
    """Nothing autograd saves for backward is as large as the buffer (nor a view of it)."""
    tensors = leaves(case, device, dtype)
    tensors[case.buffer] = tensors[case.buffer].clone()
    with svpt.backend(backend):
        sizes = saved_bytes(lambda: case.call(getattr(ops, case.op), tensors))
    assert sizes and max(sizes) < tensors[case.buffer].untyped_storage().nbytes(), sizes


def flash_floors(query: str, segments: list[tuple[str, str]]):
    """check()'s ``floors`` for a FlashAttention-style backward over the key/value ``segments``
    (input names, in key order): numerics.flash_delta_moves relative to each reference gradient."""
    def floors(case: Case, want: Run, dtype: torch.dtype) -> dict[str, float]:
        inputs = {n: t.to(want.out.device) for n, t in rounded(case, dtype).inputs.items()}
        moves = flash_delta_moves(inputs[query], [(inputs[k], inputs[v]) for k, v in segments], case.args[0],
                                  want.out, cotangent(want.out.shape, dtype).to(want.out.device), dtype)
        names = [query] + [name for pair in segments for name in pair]
        return {f"grad {n}": (move.norm() / want.grads[n].norm().clamp_min(1e-300)).item()
                for n, move in zip(names, moves)}
    return floors


def kernel_backends(op: str) -> list[str]:
    """The backends other than eager that compute ``op`` in fp32 on CPU themselves."""
    return sorted({row["backend"] for row in declared(op) if row["runs"] == row["backend"] != "eager"
                   and (row["device"], row["dtype"]) == ("cpu", "float32")})


def check_sized_route(case: Case, backend: str, sizes: dict[str, int]) -> None:
    """A call of these ``sizes`` (say a head dim past a kernel's limit) runs, traced, the
    implementation svpt.backends names for them; a hand-over says which limit; the result is
    right either way (fp32 on CPU)."""
    device, dtype = torch.device("cpu"), torch.float32
    with svpt.backend(backend):
        impl = backends.implementation(case.op, device, dtype, sizes)
    got = execute(case, backend, device, dtype)
    assert got.log == [(case.op, impl.name)], (got.log, impl)
    assert impl.name == backend or any(f"{size} <= " in impl.why for size in sizes), impl
    want = execute(case, None, device, dtype)
    for key, value in want.values(case).items():
        assert rel_err(got.values(case)[key], value) <= bound(dtype, None), key


# ------------------------------------------------------------------ whole models
def check_model_trace(backend: str, device, dtype: torch.dtype, log: list[tuple[str, str]]) -> None:
    """Every op a prompted model's forward ran (``log``, from svpt.backends.trace()) ran on the
    implementation ``backend`` declares for ``dtype`` on ``device``, and some ran on ``backend``."""
    device_type = torch.device(device).type
    runs = {row["op"]: row["runs"] for row in backends.table((device_type,), (backend,))
            if DTYPES[row["dtype"]] == dtype}
    assert log and all(impl == runs[op] for op, impl in log), (log, runs)
    assert any(impl == backend for _, impl in log), f"{backend} ran none of the ops: {log}"


class _TappedKernels:
    """A forward's svpt.backends.Kernels whose attention_saliency is recorded or replaced."""

    def __init__(self, kernels, recorded: list, inject: list | None) -> None:
        self._kernels, self._recorded, self._inject = kernels, recorded, inject

    def __getattr__(self, name):
        return getattr(self._kernels, name)

    def attention_saliency(self, q, *args):
        if self._inject is None:
            saliency = self._kernels.attention_saliency(q, *args)
        else:
            saliency = self._inject[len(self._recorded)].to(q.device, torch.float32)
        self._recorded.append(saliency.detach().clone())
        return saliency


@contextlib.contextmanager
def saliency_tap(model: torch.nn.Module, inject: list[torch.Tensor] | None = None):
    """Inside the block, the SVPT model's AE blocks record each saliency they rank (the yielded
    list, in block order), or, given ``inject`` (such a list, e.g. the float64 run's), rank those
    instead: the selected rows are then fixed to those of the run that recorded them."""
    recorded: list[torch.Tensor] = []
    prompter = model.prompter
    real = prompter.kernels
    prompter.kernels = lambda x, blocks: _TappedKernels(real(x, blocks), recorded, inject)
    try:
        yield recorded
    finally:
        del prompter.kernels


def top_k(saliency: torch.Tensor, k: int) -> torch.Tensor:
    """The selected patches, sorted: comparable between runs."""
    return saliency.topk(k, dim=-1).indices.sort(dim=-1).values.cpu()
