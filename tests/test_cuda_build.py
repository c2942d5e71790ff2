"""The CUDA code compiles (CI has nvcc but no GPU): every kernel of one activation type plus the
collector of every type and bfloat16's 4-bit matmul, for sm_90 with warnings as errors, and the host dispatch against MLX's
CUDA backend headers."""

import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "kernels" / "cuda"
NVCC = shutil.which("nvcc")

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def instances():
    sys.path.insert(0, str(KERNELS))
    try:
        import instances as table
    finally:
        sys.path.pop(0)
    return list(table.instances())


def compile_one(instance, out_dir):
    name, source, ctype, bits, gs, many_rows = instance
    if source == "collect_active.cu":
        defines = [f"-DSPQT_COLLECT_NAME={name}", f"-DSPQT_T={ctype}"]
    else:
        defines = [f"-DSPQT_NAME={name}", f"-DSPQT_T={ctype}", f"-DSPQT_BITS={bits}", f"-DSPQT_GS={gs}",
                   f"-DSPQT_MANY_ROWS={many_rows}"]
    cmd = [NVCC, "-std=c++17", "-O3", "-cubin", "-arch=sm_90", "-Werror=all-warnings", "-Xptxas", "-v",
           *defines, str(KERNELS / source), "-o", str(out_dir / f"{name}.cubin")]
    return name, subprocess.run(cmd, capture_output=True, text=True)


def test_cuda_kernels_compile(tmp_path):
    # Plus bfloat16's matmul at 4 bits: its codes are dequantized in pairs by code of its own.
    chosen = [i for i in instances() if i[2] == "__half" or i[3] == 0 or (i[1] == "zigzag_matmul.cu" and i[3] == 4)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda i: compile_one(i, tmp_path), chosen))
    failures = {name: r.stderr for name, r in results if r.returncode}
    assert not failures, failures
    for name, r in results:
        # The 32 per-lane partials must stay in registers: an array moved to local memory shows
        # as a stack frame of 128 bytes or more (a few spilled bytes are tolerated).
        frames = [int(f) for f in re.findall(r"(\d+) bytes stack frame", r.stderr)]
        assert frames and max(frames) <= 8, (name, r.stderr)


def test_bulk_kernel_compiles_for_older_gpus(tmp_path):
    """The build also emits PTX for sm_80, where the bulk-copy kernel (sm_90 instructions) is a stub."""
    name, source, ctype, bits, gs, many_rows = next(i for i in instances() if i[1] == "zigzag_gemv_bulk.cu")
    cmd = [NVCC, "-std=c++17", "-O3", "-ptx", "-arch=compute_80", "-Werror=all-warnings", f"-DSPQT_NAME={name}",
           f"-DSPQT_T={ctype}", f"-DSPQT_BITS={bits}", f"-DSPQT_GS={gs}", f"-DSPQT_MANY_ROWS={many_rows}",
           str(KERNELS / source), "-o", str(tmp_path / f"{name}.ptx")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "cp.async.bulk" not in (tmp_path / f"{name}.ptx").read_text()


def test_cuda_dispatch_compiles(tmp_path):
    """dispatch/cuda*.cpp against the installed mlx headers, the toolkit's cuda.h and the kernel-name
    header the build generates."""
    import mlx

    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    root = KERNELS.parent.parent
    toolkit = Path(NVCC).resolve().parent.parent / "include"
    found = [p for p in [toolkit, *Path("/usr/local").glob("cuda*/include")] if (p / "cuda.h").exists()]
    if not found:
        pytest.skip("the CUDA toolkit headers were not found")
    mlx_include = Path(mlx.__path__[0]) / "include"
    generated = tmp_path / "cuda_kernels"
    subprocess.run([sys.executable, str(KERNELS / "instances.py"), "--header", str(generated / "kernel_names.h")],
                   check=True)
    for source in ["dispatch/cuda.cpp", "dispatch/cuda_driver.cpp"]:
        cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Werror", f"-I{root}", f"-I{mlx_include}",
               f"-I{found[0]}", f"-I{root / 'dispatch' / 'cuda_compat'}", f"-I{generated}", str(root / source)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, (source, r.stderr[-4000:])


def test_kernel_names_have_one_source(tmp_path):
    """instances.py forms every kernel name; the dispatch finds them in the header it generates,
    which lists exactly the embedded instances."""
    dispatch = (ROOT / "dispatch" / "cuda.cpp").read_text()
    assert "spqt_zigzag_gemv" not in dispatch and "spqt_collect_active" not in dispatch
    header = tmp_path / "kernel_names.h"
    subprocess.run([sys.executable, str(KERNELS / "instances.py"), "--header", str(header)], check=True)
    listed = set(re.findall(r'"(spqt_\w+)"', header.read_text()))
    assert listed == {name for name, *_ in instances()}
