"""Build fftrainer_ds and its native module fftrainer_ds._C.

Install torch first, then `pip install --no-build-isolation -e .` (a build-isolated install would
fetch another torch into the build environment). FFTRAINER_BUILD_CUDA=0|1 forces the CUDA kernels
off or on; by default they are built when torch is a CUDA build and nvcc is found.
"""
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension

CSRC = "csrc"
CXX_FLAGS = ["-O3", "-std=c++17"]


def want_cuda() -> bool:
    flag = os.environ.get("FFTRAINER_BUILD_CUDA")
    if flag is not None:
        if flag not in ("0", "1"):
            raise SystemExit(f"FFTRAINER_BUILD_CUDA must be 0 or 1, got {flag!r}")
        return flag == "1"
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def rpath_flags(device_type: str) -> list:
    """Linker flags recording, in _C, the directories it was linked against (torch's lib, CUDA's).

    The dynamic loader resolves libc10.so and the other torch libraries when Python dlopens _C, before
    any code of ours runs; without this rpath only an interpreter that had imported torch first (so
    the libraries were already loaded) could import `fftrainer_ds._C`.
    """
    return [f"-Wl,-rpath,{path}" for path in cpp_extension.library_paths(device_type=device_type)]


def native_extension():
    sources = [f"{CSRC}/bindings.cpp", f"{CSRC}/pack_cpu.cpp"]
    if want_cuda():
        sources += [f"{CSRC}/pack_kernels.cu"]
        return cpp_extension.CUDAExtension(
            "fftrainer_ds._C", sources,
            define_macros=[("FFTRAINER_WITH_CUDA", "1")],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
            extra_link_args=rpath_flags("cuda"),
        )
    return cpp_extension.CppExtension("fftrainer_ds._C", sources, extra_compile_args=CXX_FLAGS,
                                      extra_link_args=rpath_flags("cpu"))


setup(
    name="fftrainer_ds",
    version="0.1.0",
    description="Fast failover for DeepSpeed training: per-step snapshots, shadow replicas, in-place recovery",
    packages=find_packages(include=["fftrainer_ds", "fftrainer_ds.*"]),
    package_data={"fftrainer_ds": ["_C.pyi", "py.typed"]},
    ext_modules=[native_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "deepspeed>=0.19,<0.20", "pydantic>=2", "numpy"],
    entry_points={"console_scripts": ["fftrainer-launch=fftrainer_ds.launch:main"]},
)
