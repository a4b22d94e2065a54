"""Builds the native sampler libraries during `pip install` (everything else is in pyproject.toml).

The libraries are plain shared objects loaded by onnxruntime, not Python extensions, so the
build_ext step runs ``native/build.py`` instead of compiling an extension module. It never fails
the install: without onnxruntime's headers or a compiler it warns once and builds nothing
(``native.status()`` then says why).
"""

import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, str(Path(__file__).resolve().parent))


class BuildNative(build_ext):
    def run(self) -> None:
        from native import build as native_build

        in_place = self.inplace or getattr(self, "editable_mode", False)
        out = native_build.HERE if in_place else Path(self.build_lib) / "native"
        result = native_build.build(out)
        for name, what in result.items():
            if what in ("built", "up to date"):
                print(f"native sampler: {name} {what} in {out}")
            else:
                print(f"WARNING: native sampler: {name} not built: {what}", file=sys.stderr)

    def get_outputs(self) -> list[str]:
        return []

    def get_output_mapping(self) -> dict[str, str]:
        return {}


setup(
    ext_modules=[Extension("native._libraries", sources=[])],  # a marker: BuildNative builds the real ones
    cmdclass={"build_ext": BuildNative},
)
