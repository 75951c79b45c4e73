"""svpt.backends: the one place that chooses an implementation. What each backend declares is
consistent and complete, the table users see (svpt.backends.table(), ``svpt env``) is what runs,
and a backend that cannot run says why. The hand-overs themselves are tested op by op
(tests/ops/test_<op>.py, ``test_hand_over`` and the size limits)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import svpt
from svpt import backends
from svpt.env import report

import opcheck

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SELECTABLE = list(backends.describe())


@pytest.mark.parametrize("name", SELECTABLE)
def test_every_backend_is_usable_here(name):
    """CI must test every backend: a backend unusable on every device here would drop its cases
    from tests/ops silently, so it fails here, with the backend's own reason."""
    reasons = {device: backends._REGISTRY[name].why_unusable(torch.device(device))  # noqa: SLF001
               for device in opcheck.DEVICES}
    assert any(reason is None for reason in reasons.values()), f"backend {name!r} cannot run here: {reasons}"


@pytest.mark.parametrize("name", list(backends._REGISTRY))  # noqa: SLF001 - providers included
def test_declarations_name_implemented_ops(name):
    """A module without SUPPORTS (the reference) implements every op; one with it, each op it
    declares; a PREFER rule names a registered implementation of that op and says why."""
    module = backends._REGISTRY[name].load()  # noqa: SLF001
    supports = getattr(module, "SUPPORTS", None)
    declared = backends.OPS if supports is None else list(supports)
    assert set(declared) <= set(backends.OPS), declared
    missing = [op for op in declared if not callable(getattr(module, op, None))]
    assert not missing, f"{name} declares but lacks {missing}"
    for spec in (supports or {}).values():
        assert set(spec) <= {"devices", "dtypes", "limits", "jit_trace"} and set(spec["dtypes"]) <= set(opcheck.DTYPES.values())
    for op, rules in getattr(module, "PREFER", {}).items():
        for rule in rules:
            provider = backends._REGISTRY[rule["use"]].load()  # noqa: SLF001
            assert callable(getattr(provider, op)) and rule["why"], rule


def test_table_lists_every_case_and_says_why_it_is_handed_over():
    rows = backends.table(("cpu", "cuda"))
    cases = {(r["backend"], r["op"], r["device"], r["dtype"]) for r in rows}
    assert len(cases) == len(rows) == len(SELECTABLE) * len(backends.OPS) * 2 * len(opcheck.DTYPES)
    for row in rows:
        assert row["runs"] in (row["backend"], "-", *backends._REGISTRY), row  # noqa: SLF001
        assert bool(row["why"]) == (row["runs"] != row["backend"]), row


@pytest.mark.parametrize("op", backends.OPS)
def test_table_is_what_runs(op):
    """For every case of the table on the devices here, svpt.backends.implementation names the
    table's implementation (the ops and the methods both resolve through it)."""
    for row in opcheck.declared(op):
        if row["runs"] == "-":
            continue
        with svpt.backend(row["backend"]):
            impl = backends.implementation(op, torch.device(row["device"]), opcheck.DTYPES[row["dtype"]])
        assert (impl.name, impl.why or "") == (row["runs"], row["why"]), row


def shown_implementations(text: str) -> dict[tuple[str, str], list[tuple[list[str] | None, list[str]]]]:
    """``svpt env``'s implementation lines: (backend, device) -> [(ops or None for every op,
    implementation per dtype)], or [] where the backend is not usable there."""
    shown: dict = {}
    for line in text.splitlines():
        if not line.startswith("  ") or " on " not in line:
            continue
        backend, _, device, value = line.split(None, 3)
        groups = shown.setdefault((backend, device), [])
        if value != "not usable":
            which, runs = value.split(": ")
            groups.append((None if which == "every op" else which.split(", "), runs.split(" / ")))
    return shown


def test_svpt_env_shows_the_table():
    """``svpt env`` lists, per backend and device here, which implementation runs each op in
    each dtype: every row of svpt.backends.table() is in it."""
    shown = shown_implementations(report())
    dtypes = list(opcheck.DTYPES)
    for row in backends.table(opcheck.DEVICES):
        groups = shown[(row["backend"], row["device"])]
        if row["runs"] == "-":
            assert groups == [], row
            continue
        runs = [runs for ops, runs in groups if ops is None or row["op"] in ops]
        assert len(runs) == 1 and runs[0][dtypes.index(row["dtype"])] == row["runs"], (row, groups)


def test_triton_says_why_it_cannot_run():
    triton = backends._REGISTRY["triton"].load()  # noqa: SLF001
    from svpt_kernels.triton import _common
    if _common.INTERPRET:  # tests on CPU: the interpreter serves CPU tensors only
        assert triton.why_unusable(torch.device("cpu")) is None
        assert "TRITON_INTERPRET" in triton.why_unusable(torch.device("cuda"))
    else:
        assert "TRITON_INTERPRET" in triton.why_unusable(torch.device("cpu"))
    assert "meta" in triton.why_unusable(torch.device("meta"))
    assert triton.AUTO_DEVICE_TYPES == ("cuda",)  # "auto" never picks the interpreter


def test_cpp_says_what_it_was_built_with():
    cpp = backends._REGISTRY["cpp"].load()  # noqa: SLF001
    assert "torch" in cpp.build_info()
    if not torch.cuda.is_available():
        assert cpp.why_unusable(torch.device("cuda"))  # it must say why, not claim CUDA works


def test_cpp_kernels_without_blas():
    """The C++ CPU kernels' other GEMM path (at::mm, used when torch does not link MKL), forced with
    SVPT_CPP_BLAS=0 in a fresh process (the choice is made once per process): tests/ops' C++ fp32
    and float64 cases."""
    env = dict(os.environ, SVPT_CPP_BLAS="0")
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/ops",
               "-k", "cpp-cpu-float32 or cpp-cpu-float64"]
    out = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and " passed" in out.stdout, out.stdout[-3000:] + out.stderr[-2000:]


def test_compile_table_and_svpt_env_show_what_runs_under_torch_compile(monkeypatch):
    """A PREFER rule marked "compiling" leaves svpt.backends.table() (what runs in eager forwards) as it
    is; svpt.backends.compile_table() lists the cases it changes, with the reason, and ``svpt env``
    shows them. Here with such a rule added to this machine's first kernel backend on its first device."""
    name, device = next((n, d) for n in SELECTABLE if n != "eager" for d in opcheck.DEVICES
                        if backends._REGISTRY[n].why_unusable(torch.device(d)) is None)  # noqa: SLF001
    module = backends._REGISTRY[name].load()  # noqa: SLF001
    before = backends.table((device,), (name,))
    rule = {"devices": (device,), "use": "fusible", "compiling": True, "why": "a test's rule"}
    monkeypatch.setattr(module, "PREFER", {**module.PREFER, "folded_cross_attention": [rule]})
    assert backends.table((device,), (name,)) == before
    rows = backends.compile_table((device,), (name,))
    assert {(r["op"], r["runs"]) for r in rows} == {("folded_cross_attention", "fusible")}
    assert len(rows) == len(opcheck.DTYPES) and all("while torch.compile traces" in r["why"] for r in rows)
    label = "under torch.compile"
    shown = [line[len(label):].strip() for line in report().splitlines() if line.startswith(label)]
    assert shown == [f"{name} on {device}: folded_cross_attention: fusible"], shown
