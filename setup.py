# cffi's setuptools hook cannot be declared in pyproject.toml alone.
from setuptools import setup

setup(cffi_modules=["vfiopy/_ioctl_build.py:ffibuilder"])
