"""Builds the Cython extensions in csrc/ into the butterfly package.

Set BUTTERFLY_NO_EXT=1 to skip them (the plain-Python twins are then used).
"""

import os
import platform

from setuptools import Extension, setup

ext_modules = []
# xxHash's run-time choice of AVX-512 / AVX2 / SSE2 exists for x86-64 only; elsewhere the portable build.
XXH_DISPATCH = (
    ["csrc/third_party/xxhash/xxh_x86dispatch.c"] if platform.machine().lower() in ("x86_64", "amd64") else []
)
if not os.environ.get("BUTTERFLY_NO_EXT"):
    from Cython.Build import cythonize

    ext_modules = cythonize(
        [
            Extension(
                "butterfly._native.board",
                ["csrc/board.pyx"],
                include_dirs=["csrc"],
                extra_compile_args=["-O2"],
            ),
            Extension(
                "butterfly._native.streamer",
                ["csrc/streamer.pyx", *XXH_DISPATCH],
                include_dirs=["csrc"],
                define_macros=[("BF_XXH_DISPATCH", "1" if XXH_DISPATCH else "0")],
                # Hidden: the vendored xxHash (csrc/third_party/xxhash, BSD-2) must not clash with another
                # copy in the process (the xxhash package's).
                extra_compile_args=["-O3", "-pthread", "-fvisibility=hidden"],
                extra_link_args=["-pthread"],
            ),
            Extension(
                "butterfly._native.halfmm",
                ["csrc/halfmm.pyx"],
                include_dirs=["csrc"],
                # No contraction of the C sums into FMAs the compiler chooses: every output is summed in
                # the one order csrc/halfmm.h states, wherever it is inlined.
                extra_compile_args=["-O3", "-ffp-contract=off"],
                libraries=["dl", "m"],  # dlopen of torch's libgomp (in libc itself from glibc 2.34); expf
            ),
        ],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    )

setup(ext_modules=ext_modules)
