"""Which packages the wheel holds; everything else is in pyproject.toml.

pyproject.toml alone cannot say this: ``[tool.setuptools] packages`` is either a fixed
list (which forgets a new subpackage) or ``find`` (which names packages after their
folders). Here every package under ``gpuvars/`` is found automatically, and the array
layer's folder ``backends/`` installs under the import name ``gpuvars_backends``, so a
user's own ``backends.py`` or ``backends/`` beside their script cannot shadow it.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["gpuvars", "gpuvars.*"]) + ["gpuvars_backends"],
    package_dir={"gpuvars_backends": "backends"},
)
