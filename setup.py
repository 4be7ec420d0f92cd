# cffi needs setup.py to hook its extension into the build; all metadata lives in pyproject.toml
from setuptools import setup

setup(cffi_modules=["native/build_ffi.py:ffibuilder"])
