"""The CUDA kernel instantiations the extension embeds, one small binary each.

Printed as a CMake list of `name,source,type,bits,group_size` entries by cmake/cuda_kernels.cmake.
"""

import re
from pathlib import Path

DTYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}


def _contract(name: str) -> tuple[int, ...]:
    """One of the format lists of kernels/contract.h (read as text: the build has no extension yet)."""
    text = (Path(__file__).resolve().parent.parent / "contract.h").read_text()
    values = re.search(rf"{name}\[\]\s*=\s*\{{([^}}]*)\}}", text).group(1)
    return tuple(int(v) for v in values.split(","))


BITS = _contract("kSupportedBits")
GROUP_SIZES = _contract("kSupportedGroupSizes")
MMA_BITS = _contract("kTensorCoreBits")
MMA_GROUP_SIZES = _contract("kTensorCoreGroupSizes")


def gemv_name(dtype: str, bits: int, group_size: int, mma: bool = False) -> str:
    return f"spqt_zigzag_gemv{'_mma' if mma else ''}_{dtype}_b{bits}_g{group_size}"


def instances():
    for dtype, ctype in DTYPES.items():
        yield f"spqt_collect_active_{dtype}", "collect_active.cu", ctype, 0, 0
        for bits in BITS:
            for gs in GROUP_SIZES:
                yield gemv_name(dtype, bits, gs), "zigzag_gemv.cu", ctype, bits, gs
        for bits in MMA_BITS:
            for gs in MMA_GROUP_SIZES:
                yield gemv_name(dtype, bits, gs, mma=True), "zigzag_gemv_mma.cu", ctype, bits, gs


if __name__ == "__main__":
    print(";".join(",".join(map(str, inst)) for inst in instances()))
