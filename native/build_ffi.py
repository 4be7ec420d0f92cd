"""cffi builder for the edgert C core (API mode, out-of-line): run by `pip install .`, never at import time.

The declarations come from the cdef block of native/include/edgert.h, so the header stays the one place that
declares the C interface. Every ISA variant is compiled in the same pass: each SIMD source file sets its own target
with a pragma, so there is no -march flag and one build serves every CPU of its architecture.
"""
import glob
import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "include", "edgert.h")

# -ffp-contract=off: the reference quantizers must not fuse multiply-adds, or they stop matching ggml bit for bit
CFLAGS = ["-O3", "-std=c11", "-ffp-contract=off", "-fno-math-errno", "-pthread", "-Wall", "-Wno-unused-function"]


def cdef_text() -> str:
    text = open(HEADER, encoding="utf-8").read()
    m = re.search(r"/\* cdef-begin \*/(.*)/\* cdef-end \*/", text, re.S)
    if not m:
        raise RuntimeError(f"{HEADER}: cdef markers not found")
    return m.group(1)


def sources() -> list[str]:
    return sorted(os.path.relpath(p) for p in glob.glob(os.path.join(HERE, "src", "**", "*.c"), recursive=True))


ffibuilder = FFI()
ffibuilder.cdef(cdef_text())
ffibuilder.set_source(
    "edgert._ffi",
    '#include "edgert.h"\n',
    sources=sources(),
    include_dirs=[os.path.relpath(os.path.join(HERE, "include"))],
    extra_compile_args=CFLAGS,
    extra_link_args=["-pthread"],
    libraries=["m"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
