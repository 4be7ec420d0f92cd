# cffi needs setup.py to hook its extension into the build; all metadata lives in pyproject.toml.
#
# build_py also ships the NPU emulator's sources (firmware_bridge/ and the C core's native/ sources it compiles in)
# as edgert/_src/, so `edgert npu-sim` can build the emulator from an installed package, not only from a checkout.
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).parent
SHIPPED = {
    "firmware_bridge": ("*.c", "*.h", "*.ld", "Makefile", "*.md"),
    "native": ("*.c", "*.h", "*.inc"),
}


class build_py_with_firmware(build_py):
    def run(self):
        super().run()
        dest = Path(self.build_lib) / "edgert" / "_src"
        for top, patterns in SHIPPED.items():
            for pattern in patterns:
                for f in (HERE / top).rglob(pattern):
                    rel = f.relative_to(HERE)
                    if "build" in rel.parts:
                        continue
                    target = dest / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, target)


setup(cffi_modules=["native/build_ffi.py:ffibuilder"], cmdclass={"build_py": build_py_with_firmware})
