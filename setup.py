"""Packaging detail pyproject.toml cannot express: the top-level configs/ folder ships as mmssl.configs."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["mmssl", "mmssl.*", "data_prep", "data_prep.*", "eval", "eval.*"])
    + ["mmssl.configs", "mmssl.configs.models"],
    package_dir={"mmssl.configs": "configs", "mmssl.configs.models": "configs/models"},
    package_data={"mmssl.configs": ["*.yaml"], "mmssl.configs.models": ["*.json"]},
)
