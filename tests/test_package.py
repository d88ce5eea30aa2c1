"""Package-level contracts: the public API, and a Flax-free core."""

import subprocess
import sys

import nestedlora_jax


def test_core_imports_no_flax():
    code = (
        "import sys, nestedlora_jax\n"
        "import nestedlora_jax.objectives, nestedlora_jax.laplacians, nestedlora_jax.operators\n"
        "import nestedlora_jax.training, nestedlora_jax.evaluation, nestedlora_jax.metrics\n"
        "assert 'flax' not in sys.modules, 'the core imported flax'\n"
        "nestedlora_jax.solve\n"
        "assert 'flax' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_names_resolve():
    for name in nestedlora_jax.__all__:
        assert getattr(nestedlora_jax, name) is not None, name


def test_package_version_matches_pyproject():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', text, re.M).group(1) == nestedlora_jax.__version__
