"""Packaging detail pyproject.toml cannot express: the top-level configs/ folder ships as mmssl.configs."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["mmssl", "mmssl.*", "data_prep", "data_prep.*", "eval", "eval.*"])
    + ["mmssl.configs"],
    package_dir={"mmssl.configs": "configs"},
    package_data={"mmssl.configs": ["*.yaml", "models/*.json"]},
)
