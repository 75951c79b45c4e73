"""Build of svpt, with its optional C++/CUDA extension ``svpt_kernels._C`` (csrc/).

The extension is built against the torch that is importable at build time, so install
with ``pip install --no-build-isolation .`` after installing torch (pip's isolated build
environment would otherwise pull a second torch and break the ABI match).

What gets built:
  * CPU kernels (csrc/ops.cpp, csrc/cpu/*.cpp), always, with OpenMP through ATen;
  * CUDA kernels (csrc/cuda/*.cu) when a GPU is visible or TORCH_CUDA_ARCH_LIST names one (and nvcc
    and a CUDA build of torch are there), or when SVPT_BUILD_CUDA=1 asks for them.
The object files stay in build/svpt-ext-*/ between installs: a second install of an unchanged tree
only relinks (ninja recompiles the sources that changed).
If the extension cannot be built (no torch at build time, no compiler, a compile error),
the install still succeeds, prints why, and svpt runs on its other backends; ``svpt env``
says whether the extension is loaded.

Environment variables:
  SVPT_BUILD_EXT    auto (default): build if possible, carry on without it otherwise;
                    0: do not build the extension; 1: build it and fail the install if
                    that fails.
  SVPT_BUILD_CUDA   auto (default): add the CUDA kernels for the visible GPUs or for
                    TORCH_CUDA_ARCH_LIST, when nvcc and a CUDA torch are present (none of
                    these: CPU kernels only); 0: CPU kernels only (much faster build); 1: CUDA
                    kernels required (the install fails without them).
  TORCH_CUDA_ARCH_LIST  GPU architectures for nvcc (torch's variable); setting it asks for the
                    CUDA kernels in auto mode. Defaults to the visible GPUs, or to "9.0"
                    (H100/H200) with SVPT_BUILD_CUDA=1 and no GPU visible.
  MAX_JOBS          parallel compile jobs (torch's variable). Defaults to the number of
                    cores, bounded by free memory (nvcc needs several GB per job).
"""
from __future__ import annotations

import copy
import os
import shutil
import sys
import sysconfig

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_SOURCES = ["csrc/ops.cpp", "csrc/cpu/softmax.cpp", "csrc/cpu/da_mix.cpp", "csrc/cpu/ae_update.cpp",
               "csrc/cpu/attention_saliency.cpp", "csrc/cpu/prompt_attention.cpp",
               "csrc/cpu/folded_cross_attention.cpp"]
CUDA_SOURCES = ["csrc/cuda/da_mix.cu", "csrc/cuda/ae_update.cu", "csrc/cuda/attention_saliency.cu",
                "csrc/cuda/prompt_attention.cu", "csrc/cuda/folded_cross_attention.cu"]


def _say(msg: str) -> None:
    # setuptools hides ordinary output unless pip runs with -v; stderr lines still show
    # in pip's error report and in CI logs.
    print(f"svpt setup: {msg}", file=sys.stderr, flush=True)


def _mode(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in ("0", "false", "no", "off"):
        return "0"
    if value in ("1", "true", "yes", "on"):
        return "1"
    raise SystemExit(f"svpt setup: {name}={value!r} is not accepted; use auto, 0 or 1")


def _free_mem_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 8.0


def _set_max_jobs(with_cuda: bool) -> None:
    if "MAX_JOBS" in os.environ:
        return
    cores = os.cpu_count() or 1
    per_job = 4.0 if with_cuda else 1.5  # GiB per compiler process, measured upper bounds
    os.environ["MAX_JOBS"] = str(max(1, min(cores, int(_free_mem_gib() // per_job))))


def _set_cuda_home() -> None:
    """torch guesses CUDA_HOME as the parent of the nvcc on PATH, which is wrong when that
    nvcc is a wrapper script (e.g. /usr/local/bin/nvcc -> /usr/local/cuda-13.0): ask nvcc
    where its toolkit is, so that -lcudart and the headers are found."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists(os.path.join(guess, "include", "cuda_runtime.h")):
        return
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cu")
        open(src, "w").close()
        try:
            out = subprocess.run([nvcc, "--dryrun", "-c", src, "-o", os.path.join(tmp, "probe.o")],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ TOP="):
            top = os.path.normpath(line.split("=", 1)[1].strip())
            if os.path.isdir(top):
                os.environ["CUDA_HOME"] = top
                _say(f"CUDA_HOME={top} (from {nvcc})")
            return


def decide_cuda(mode: str, torch_cuda: str | None, visible_gpus: int, arch_list: str | None,
                have_nvcc: bool) -> tuple[bool, str]:
    """Whether to compile the CUDA kernels, and why (or why not), from the facts of this build:
    ``SVPT_BUILD_CUDA`` (``mode``: auto, 0 or 1), torch's CUDA version (``None``: a CPU torch), the
    GPUs torch sees, ``TORCH_CUDA_ARCH_LIST`` and whether nvcc is there. In auto mode the kernels
    are built only for a GPU that is visible or named by TORCH_CUDA_ARCH_LIST: nvcc alone (a CPU
    machine with the toolkit installed) is no reason to spend minutes on kernels nothing here can
    run. SVPT_BUILD_CUDA=1 asks for them (the install fails if they cannot be built)."""
    if mode == "0":
        return False, "SVPT_BUILD_CUDA=0"
    if mode == "auto" and not visible_gpus and not arch_list:
        return False, ("no GPU is visible and TORCH_CUDA_ARCH_LIST is not set; set TORCH_CUDA_ARCH_LIST "
                       "(e.g. 9.0) or SVPT_BUILD_CUDA=1 to build them for another machine's GPU")
    if torch_cuda is None:
        why = "torch is not a CUDA build"
    elif not have_nvcc:
        why = "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    else:
        targets = arch_list or ("the visible GPUs" if visible_gpus else "9.0 (H100/H200; no GPU is visible)")
        return True, f"TORCH_CUDA_ARCH_LIST={targets}"
    if mode == "1":
        raise SystemExit(f"svpt setup: SVPT_BUILD_CUDA=1 but the CUDA kernels cannot be built: {why}")
    return False, why


def _have_nvcc() -> bool:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return shutil.which("nvcc") is not None or bool(home and os.path.exists(os.path.join(home, "bin", "nvcc")))


def build_dir(with_cuda: bool) -> str:
    """Where the object files live between installs: in the source tree (build/ is ignored by git),
    one folder per interpreter and kernel set, so that a second ``pip install -e .`` of an unchanged
    tree only relinks (pip's editable build would otherwise compile in a fresh temporary folder)."""
    tag = f"{sys.implementation.cache_tag}-{sysconfig.get_platform()}-{'cuda' if with_cuda else 'cpu'}"
    return os.path.join(HERE, "build", f"svpt-ext-{tag}")


def _extensions():
    """(ext_modules, cmdclass) for setup(); empty when the extension is not built."""
    build_ext_mode = _mode("SVPT_BUILD_EXT")
    if build_ext_mode == "0":
        _say("SVPT_BUILD_EXT=0: the C++/CUDA extension is not built; backend 'cpp' will be unusable")
        return [], {}
    try:
        import torch
    except Exception as exc:
        msg = (f"the C++/CUDA extension is not built: torch is not importable at build time "
               f"({type(exc).__name__}: {exc}); install torch first, then pip install --no-build-isolation .")
        if build_ext_mode == "1":
            raise SystemExit("svpt setup: " + msg)
        _say(msg)
        return [], {}

    cuda_mode = _mode("SVPT_BUILD_CUDA")
    gpus = torch.cuda.device_count() if torch.version.cuda is not None else 0
    with_cuda, cuda_why = decide_cuda(cuda_mode, torch.version.cuda, gpus, os.environ.get("TORCH_CUDA_ARCH_LIST"),
                                      _have_nvcc())
    if with_cuda:
        _set_cuda_home()  # before torch.utils.cpp_extension reads it
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not gpus:
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"  # SVPT_BUILD_CUDA=1 with no GPU to ask: the H100/H200
    _set_max_jobs(with_cuda)

    linux = sys.platform.startswith("linux")
    # -fopenmp: at::parallel_for is inline; without _OPENMP it silently runs on one thread.
    # -g0 overrides the -g that Python's CFLAGS add: debug info for ATen's templates doubles
    # compile and link time.
    cxx = ["-O3", "-g0"] + (["-fopenmp"] if linux else [])
    link = ["-fopenmp"] if linux else []

    # Recorded in the binary (svpt_kernels.cpp.build_info()): which torch, which GPU archs.
    # Tokens only (no spaces or semicolons): they pass through a shell command line.
    info = [f"-DSVPT_TORCH_VERSION={torch.__version__}"]
    if with_cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or " ".join(
            "{}.{}".format(*torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count()))
        info.append("-DSVPT_CUDA_ARCHS=" + "_".join(archs.replace(";", " ").split()))

    def make(cuda: bool):
        if cuda:
            return CUDAExtension(
                "svpt_kernels._C", CPU_SOURCES + CUDA_SOURCES,
                extra_compile_args={"cxx": cxx + info + ["-DSVPT_WITH_CUDA"],
                                    "nvcc": ["-O3", "-DSVPT_WITH_CUDA", "-lineinfo"]},
                extra_link_args=link)
        return CppExtension("svpt_kernels._C", CPU_SOURCES, extra_compile_args={"cxx": cxx + info[:1]},
                            extra_link_args=link)

    class SvptBuildExt(BuildExtension):
        """Builds the extension; on failure (auto modes) retries without CUDA, then gives up
        with a plain message instead of failing the install."""

        def _record(self, why: str | None) -> None:
            """Leave (or clear) svpt_kernels/_C_not_built.txt, which svpt_kernels.cpp quotes to say
            why the extension is missing: pip hides this build's output unless run with -v."""
            dirs = {os.path.join(self.build_lib, "svpt_kernels")}
            if self.inplace or self.editable_mode:
                dirs.add(os.path.join(HERE, "svpt_kernels"))
            for folder in dirs:
                path = os.path.join(folder, "_C_not_built.txt")
                if why is None:
                    if os.path.exists(path):
                        os.remove(path)
                    continue
                os.makedirs(folder, exist_ok=True)
                with open(path, "w") as f:
                    f.write(why + "\n")

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = build_dir(with_cuda)  # kept between installs: ninja recompiles what changed

        def build_extensions(self):
            self._record(None)
            try:
                super().build_extensions()
                return
            except Exception as exc:  # compiler missing, compile error, ...
                error, why = exc, f"{type(exc).__name__}: {exc}"
            if with_cuda and cuda_mode == "auto" and build_ext_mode == "auto":
                _say(f"building the CUDA kernels failed ({why}); retrying with the CPU kernels only")
                cpu_ext = make(False)
                self.build_temp = build_dir(False)
                for ext in self.extensions:  # keep the finalized Extension, swap what it compiles
                    for attr in ("sources", "extra_compile_args", "define_macros", "include_dirs", "libraries",
                                 "library_dirs", "runtime_library_dirs", "extra_link_args"):
                        setattr(ext, attr, copy.deepcopy(getattr(cpu_ext, attr)))
                try:
                    super().build_extensions()
                    _say("built the C++ extension WITHOUT CUDA kernels: backend 'cpp' runs on CPU only")
                    return
                except Exception as exc:
                    error, why = exc, f"{type(exc).__name__}: {exc}"
            if build_ext_mode == "1" or (with_cuda and cuda_mode == "1"):
                raise error
            # Nothing to copy or install: the package is pure Python then.
            self._record(f"the build failed: {why} (reinstall with pip install -v to see the compiler output)")
            self.extensions = []
            self.distribution.ext_modules = []
            _say(f"the C++/CUDA extension was NOT built ({why}; the compiler output is above); svpt works "
                 "without it, but backend 'cpp' is unusable (see `svpt env`)")

    what = f"CPU and CUDA kernels ({cuda_why})" if with_cuda else f"CPU kernels only (no CUDA kernels: {cuda_why})"
    _say(f"building the C++ extension svpt_kernels._C with {what}, MAX_JOBS={os.environ['MAX_JOBS']}")
    return [make(with_cuda)], {"build_ext": SvptBuildExt.with_options(use_ninja=True)}


if __name__ == "__main__":  # (tests/test_build.py imports this file for decide_cuda)
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
