"""Package layout only (everything else is in pyproject.toml).

The Triton ops live in the top-level ``kernels/`` folder of the repository but install as
``polar_sparsity.kernels``: a top-level module named ``kernels`` would collide with PyPI's ``kernels``
distribution. pyproject.toml cannot both discover packages and map one onto another folder, hence
this file.
"""

from setuptools import find_packages, setup

KERNEL_PACKAGES = ["kernels", *(f"kernels.{name}" for name in find_packages("kernels"))]

setup(
    packages=[
        *find_packages(include=["polar_sparsity", "polar_sparsity.*"]),
        *(f"polar_sparsity.{name}" for name in KERNEL_PACKAGES),
    ],
    package_dir={"polar_sparsity.kernels": "kernels"},
    package_data={"polar_sparsity": ["assets/**/*"], "polar_sparsity.kernels": ["*.json"]},
)
