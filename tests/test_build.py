"""setup.py's build decisions, without compiling anything.

* CUDA kernels are compiled only for a GPU that is visible or named by TORCH_CUDA_ARCH_LIST, or
  when SVPT_BUILD_CUDA=1 asks for them; nvcc alone on a CPU machine is not a reason.
* The object files live in a fixed folder of the source tree (ignored by git), one per kernel
  set, so that a second install of an unchanged tree does not compile from scratch.

Run: python -m pytest tests/test_build.py -q
"""
from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("svpt_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: setup() does not run
    return module


CUDA = "13.0"


@pytest.mark.parametrize("mode, torch_cuda, gpus, arch_list, nvcc, build", [
    ("auto", CUDA, 0, None, True, False),   # CPU machine with nvcc: no CUDA kernels
    ("auto", CUDA, 1, None, True, True),    # a visible GPU
    ("auto", CUDA, 0, "9.0", True, True),   # named by TORCH_CUDA_ARCH_LIST
    ("auto", CUDA, 1, None, False, False),  # no nvcc: carry on with the CPU kernels
    ("auto", None, 1, None, True, False),   # a CPU build of torch
    ("1", CUDA, 0, None, True, True),       # asked for: built for 9.0
    ("0", CUDA, 1, "9.0", True, False),     # refused
])
def test_decide_cuda(setup_py, mode, torch_cuda, gpus, arch_list, nvcc, build):
    built, why = setup_py.decide_cuda(mode, torch_cuda, gpus, arch_list, nvcc)
    assert built is build
    assert why  # every decision says why


def test_cpu_machine_with_nvcc_is_told_how_to_get_cuda_kernels(setup_py):
    _, why = setup_py.decide_cuda("auto", CUDA, 0, None, True)
    assert "TORCH_CUDA_ARCH_LIST" in why and "SVPT_BUILD_CUDA=1" in why


@pytest.mark.parametrize("torch_cuda, nvcc, reason", [(None, True, "not a CUDA build"), (CUDA, False, "nvcc")])
def test_asked_cuda_kernels_that_cannot_be_built_fail_the_install(setup_py, torch_cuda, nvcc, reason):
    with pytest.raises(SystemExit, match=reason):
        setup_py.decide_cuda("1", torch_cuda, 1, None, nvcc)


def test_object_files_persist_in_an_ignored_folder_per_kernel_set(setup_py):
    cpu, cuda = Path(setup_py.build_dir(False)), Path(setup_py.build_dir(True))
    assert cpu != cuda
    for folder in (cpu, cuda):
        assert folder.parent == ROOT / "build"
        ignored = subprocess.run(["git", "check-ignore", "-q", str(folder)], cwd=ROOT)
        assert ignored.returncode == 0, f"{folder} is not ignored by git"
