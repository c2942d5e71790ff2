"""Builds the SIMT emulator with the Metal kernel sources and drives it through ctypes (test-only).

The kernels in kernels/metal are compiled as C++ against emulator/metal_compat.h (one translation
unit per .metal file, in parallel) and linked with the emulator and its host harness, which runs
the host encoding of dispatch/metal_encoding.h, into one shared library, cached under the pytest
cache by a hash of every source involved.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ROOT / "kernels" / "metal"
EMULATOR = Path(__file__).resolve().parent / "emulator"

# Warnings are errors: a kernel that only warns here may not compile as Metal. Unknown attributes are
# Metal's ([[buffer(0)]], ...).
CXXFLAGS = ["-std=c++20", "-O1", "-fPIC", "-pthread", "-Wall", "-Wextra", "-Werror", "-Wno-attributes",
            "-Wno-unknown-warning-option"]
KERNEL_FLAGS = ["-x", "c++", "-I", str(EMULATOR / "include"), "-Wno-unused-parameter"]

KINDS = {"dense": 0, "indices": 1, "packed": 2, "threshold": 3}


def find_compiler() -> str | None:
    for cand in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def metal_sources() -> list[Path]:
    return sorted(KERNELS.glob("*.metal"))


def _sources() -> list[Path]:
    files = sorted(KERNELS.iterdir()) + sorted(EMULATOR.rglob("*")) + [ROOT / "kernels" / "contract.h"]
    return [f for f in files if f.is_file()]


def build(cxx: str, cache_dir: Path, *, encoding: str | None = None) -> Path:
    """The emulator library: the kernels, the emulator and its harness, which runs the host encoding
    of dispatch/metal_encoding.h, or the text ``encoding`` in its place (to check that a wrong
    encoding fails the tests). Objects are cached by the hash of what they are built from, so a
    variant rebuilds only the harness."""
    encoding = (ROOT / "dispatch" / "metal_encoding.h").read_text() if encoding is None else encoding
    base = hashlib.sha256()
    for f in _sources():
        base.update(f.name.encode())
        base.update(f.read_bytes())
    base.update(" ".join([cxx, *CXXFLAGS]).encode())
    variant = hashlib.sha256(base.digest() + encoding.encode()).hexdigest()[:16]
    lib = cache_dir / variant / "libspqt_metal_emulator.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=lib.parent))  # private to this process: parallel builds may race
    # The harness includes "metal_encoding.h" from this directory; the header includes
    # ../kernels/contract.h and friends, so the kernels directory sits beside it.
    (work / "dispatch").mkdir()
    (work / "dispatch" / "metal_encoding.h").write_text(encoding)
    (work / "kernels").symlink_to(ROOT / "kernels", target_is_directory=True)
    units = [(src, KERNEL_FLAGS, base) for src in [*metal_sources(), EMULATOR / "selfcheck.metal"]]
    # swapcontext returns twice; the scheduler keeps nothing in registers across it.
    units += [(EMULATOR / "simt.cpp", ["-Wno-clobbered"], base),
              (EMULATOR / "harness.cpp", ["-I", str(work / "dispatch")], hashlib.sha256(encoding.encode()))]
    objects_dir = cache_dir / "objects"
    objects_dir.mkdir(parents=True, exist_ok=True)
    jobs, objects = [], []
    for src, extra, depends in units:
        key = hashlib.sha256(depends.digest() + src.name.encode() + base.digest()).hexdigest()[:16]
        obj = objects_dir / f"{src.stem}-{key}.o"
        objects.append(obj)
        if obj.exists():
            continue
        tmp_obj = work / obj.name
        cmd = [cxx, *CXXFLAGS, *extra, "-c", str(src), "-o", str(tmp_obj)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        jobs.append((src, tmp_obj, obj, proc))
    errors = []
    for src, tmp_obj, obj, proc in jobs:
        log, _ = proc.communicate()
        if proc.returncode:
            errors.append(f"--- {src.relative_to(ROOT)}\n{log}")
        else:
            tmp_obj.replace(obj)
    if errors:
        shutil.rmtree(work, ignore_errors=True)
        raise RuntimeError("compiling the kernels for the emulator failed:\n" + "\n".join(errors))
    tmp = work / lib.name
    subprocess.run([cxx, "-shared", "-pthread", "-o", str(tmp), *map(str, objects)], check=True)
    tmp.replace(lib)
    shutil.rmtree(work, ignore_errors=True)
    return lib


class GatherArgs(ctypes.Structure):
    """The arguments of spqt_emu_zigzag_gather_gemv, as emulator/harness.cpp's GatherArgs."""

    _fields_ = [
        ("type", ctypes.c_char_p), ("bits", ctypes.c_int), ("gs", ctypes.c_int), ("prologue", ctypes.c_int),
        ("x", ctypes.c_void_p), ("w", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("biases", ctypes.c_void_p),
        ("bands", ctypes.c_int), ("w2", ctypes.c_void_p), ("scales2", ctypes.c_void_p),
        ("biases2", ctypes.c_void_p), ("bands2", ctypes.c_int), ("experts", ctypes.c_void_p),
        ("ids_unsigned", ctypes.c_int), ("threshold", ctypes.c_void_p), ("t_len", ctypes.c_int),
        ("y", ctypes.c_void_p), ("rows_x", ctypes.c_int), ("M", ctypes.c_int), ("K", ctypes.c_int),
        ("E", ctypes.c_int), ("splits", ctypes.c_int), ("seed", ctypes.c_uint64),
    ]


class Emulator:
    """The emulated Metal backend: each call runs the host encoding that dispatch/metal.cpp runs
    (dispatch/metal_encoding.h), on the emulator's fake encoder."""

    def __init__(self, lib_path: Path):
        self.lib = ctypes.CDLL(str(lib_path))
        p, i, u64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64
        s = ctypes.c_char_p
        f = ctypes.c_float
        self.lib.spqt_emu_zigzag_gemv.argtypes = [s, i, i, i, p, p, p, p, p, i, p, i, i, i, i, u64, i, p, f, p, p, i]
        self.lib.spqt_emu_zigzag_gather_gemv.argtypes = [ctypes.POINTER(GatherArgs), p, i]
        self.lib.spqt_emu_collect_active.argtypes = [s, p, p, i, i, i, u64, i, p, f, p, p, i]
        self.lib.spqt_emu_copy_to_contiguous.argtypes = [i, p, ctypes.c_int64, ctypes.c_int64, p, p, i, p, u64, p, i]
        self.lib.spqt_emu_selfcheck.argtypes = [s, i, u64, p, i, p, i]
        self.lib.spqt_emu_last_dispatches.argtypes = [p, i]

    @staticmethod
    def _check(rc, err):
        if rc:
            raise RuntimeError(err.value.decode())

    @staticmethod
    def _ptr(a):
        return None if a is None else a.ctypes.data_as(ctypes.c_void_p)

    def zigzag_gemv(self, type_name, x, w, scales, biases, active, kind, group_size, bits, *, splits=0, seed=0,
                    prologue=0, norm=None, eps=0.0, residual=None):
        """x: (M, K) raw (float32, float16, or bfloat16 as uint16), (M, 2K) for the SwiGLU prologue (2);
        norm: K raw weights of the RMSNorm prologue (1); residual: (M, N) raw. Returns y (M, N) in x's raw dtype."""
        M, K = x.shape
        K = K // 2 if prologue == 2 else K
        bands = w.shape[0]
        N = bands * group_size
        y = np.empty((M, N), dtype=x.dtype)
        if active is not None:
            active = np.ascontiguousarray(active, dtype=np.float32 if kind == "threshold" else np.int32)
        err = ctypes.create_string_buffer(1024)
        rc = self.lib.spqt_emu_zigzag_gemv(
            type_name.encode(), bits, group_size, KINDS[kind],
            self._ptr(np.ascontiguousarray(x)), self._ptr(np.ascontiguousarray(w)),
            self._ptr(np.ascontiguousarray(scales)), self._ptr(np.ascontiguousarray(biases)),
            self._ptr(active), 0 if active is None else active.size, self._ptr(y), M, N, K, splits, seed,
            prologue, self._ptr(None if norm is None else np.ascontiguousarray(norm)), eps,
            self._ptr(None if residual is None else np.ascontiguousarray(residual)), err, len(err))
        self._check(rc, err)
        return y

    def zigzag_gather_gemv(self, type_name, x, w, scales, biases, experts, threshold, group_size, bits, *,
                           second=None, prologue=0, splits=0, seed=0):
        """The experts' product: x (R_x, K) raw ((R_x, 2K) for the SwiGLU prologue, 2), w (E, bands, K,
        words), scales and biases (E, bands, K) raw, experts (R,) int32 or uint32 (kept as given) with R
        a multiple of R_x, threshold None (every column) or float32 (E,) or scalar; second: (w2,
        scales2, biases2) of another set of experts, whose bands follow. Returns y (R, N) in x's raw
        dtype."""
        rows_x, K = x.shape
        K = K // 2 if prologue == 2 else K
        E, bands = w.shape[:2]
        ids = np.asarray(experts)
        ids = np.ascontiguousarray(ids, dtype=ids.dtype if ids.dtype == np.uint32 else np.int32)
        w2, scales2, biases2 = (None, None, None) if second is None else map(np.ascontiguousarray, second)
        bands2 = 0 if w2 is None else w2.shape[1]
        y = np.empty((ids.size, (bands + bands2) * group_size), dtype=x.dtype)
        t = None if threshold is None else np.ascontiguousarray(threshold, dtype=np.float32).reshape(-1)
        arrays = [np.ascontiguousarray(a) for a in (x, w, scales, biases)]  # alive until the call returns
        args = GatherArgs(
            type_name.encode(), bits, group_size, prologue, *map(self._ptr, arrays), bands, self._ptr(w2),
            self._ptr(scales2), self._ptr(biases2), bands2, self._ptr(ids), int(ids.dtype == np.uint32),
            self._ptr(t), 0 if t is None else t.size, self._ptr(y), rows_x, ids.size, K, E, splits, seed)
        err = ctypes.create_string_buffer(1024)
        self._check(self.lib.spqt_emu_zigzag_gather_gemv(ctypes.byref(args), err, len(err)), err)
        return y

    def collect_active(self, type_name, x, threshold, *, threads=0, seed=0, prologue=0, norm=None, eps=0.0):
        K = x.size // 2 if prologue == 2 else x.size
        out = np.empty(K + 1, dtype=np.int32)
        t = np.ascontiguousarray(threshold, dtype=np.float32).reshape(-1)
        err = ctypes.create_string_buffer(1024)
        rc = self.lib.spqt_emu_collect_active(
            type_name.encode(), self._ptr(np.ascontiguousarray(x)), self._ptr(t), t.size, K, threads, seed,
            prologue, self._ptr(None if norm is None else np.ascontiguousarray(norm)), eps, self._ptr(out), err,
            len(err))
        self._check(rc, err)
        return out

    def copy_to_contiguous(self, view: np.ndarray, *, seed=0):
        """Copies a numpy view through the kernel, given its base buffer, shape and element strides."""
        base = view
        while base.base is not None:
            base = base.base
        base = base.reshape(-1)
        item = view.itemsize
        offset = (view.__array_interface__["data"][0] - base.__array_interface__["data"][0]) // item
        shape = np.array(view.shape, dtype=np.int32)
        strides = np.array([s // item for s in view.strides], dtype=np.int64)
        out = np.empty(view.shape, dtype=view.dtype)
        err = ctypes.create_string_buffer(1024)
        rc = self.lib.spqt_emu_copy_to_contiguous(
            item, self._ptr(base), base.size, offset, self._ptr(shape), self._ptr(strides), view.ndim, self._ptr(out), seed,
            err, len(err))
        self._check(rc, err)
        return out

    def last_dispatches(self) -> list[tuple[str, tuple[int, int, int], int]]:
        """The dispatches the shared host encoding made in the last call: (kernel, grid, threads)."""
        out = ctypes.create_string_buffer(1 << 16)
        self.lib.spqt_emu_last_dispatches(out, len(out))
        rows = []
        for line in out.value.decode().splitlines():
            name, grid, threads = line.split()
            rows.append((name, tuple(int(v) for v in grid[5:].split(",")), int(threads[8:])))
        return rows

    def selfcheck(self, name, threads, out_len, *, seed=0):
        out = np.empty(out_len, dtype=np.float32)
        err = ctypes.create_string_buffer(1024)
        rc = self.lib.spqt_emu_selfcheck(name.encode(), threads, seed, self._ptr(out), out_len, err, len(err))
        self._check(rc, err)
        return out
