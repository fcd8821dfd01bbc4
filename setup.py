"""Build the C resampler extension (hw._resample); everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "hw._resample",
            sources=["hw/csrc/resample_module.c", "hw/csrc/resample.c"],
            include_dirs=["hw/csrc"],
            extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra", "-fno-math-errno"],
        )
    ],
)
