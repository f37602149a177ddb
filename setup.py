"""Builds the Cython extensions in csrc/ into the butterfly package.

Set BUTTERFLY_NO_EXT=1 to skip them (the plain-Python twins are then used).
"""

import os

from setuptools import Extension, setup

ext_modules = []
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
                ["csrc/streamer.pyx"],
                include_dirs=["csrc"],
                # Inline the vendored xxhash.h (csrc/third_party/xxhash, BSD-2) into this module only.
                define_macros=[("XXH_INLINE_ALL", None)],
                extra_compile_args=["-O3", "-pthread"],
                extra_link_args=["-pthread"],
            ),
        ],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    )

setup(ext_modules=ext_modules)
