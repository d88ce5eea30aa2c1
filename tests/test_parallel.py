"""Data parallelism over a device mesh: same samples, same result as one device.

The multi-device runs happen in a subprocess (``multidevice_check.py``) because the number of
fake CPU devices must be fixed before JAX initialises, and this test process has already
initialised JAX with one device.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from nestedlora_jax.parallel import batch_sharding, check_batch_divisible, data_parallel_mesh

STEPS = 30


@pytest.fixture(scope="module")
def multidevice():
    script = Path(__file__).with_name("multidevice_check.py")
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(script), str(STEPS)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _flat(params):
    return np.concatenate([np.asarray(p, dtype=np.float64) for p in params])


@pytest.mark.parametrize("devices", ["2", "4"])
def test_data_parallel_matches_single_device(multidevice, devices):
    single, multi = multidevice["1"], multidevice[devices]
    # Same seed and global batch: the same samples, so the same trajectory up to the order of
    # the partial sums in the batch means (float32 round-off).
    assert len(multi["losses"]) == STEPS // 10
    np.testing.assert_allclose(multi["losses"], single["losses"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(multi["eigenvalues"], single["eigenvalues"], rtol=1e-4, atol=1e-6)
    a, b = _flat(single["params"]), _flat(multi["params"])
    assert np.max(np.abs(a - b)) <= 1e-5 * max(1.0, np.max(np.abs(a)))
    # ...and training did move the parameters, so agreement is not trivial.
    assert single["losses"][0] != single["losses"][-1]
    # Parameters are replicated on every device of the mesh.
    assert multi["devices_holding_params"] == [devices]


def test_solve_data_parallel_matches_single_device(multidevice):
    energies = multidevice["solve_energies"]
    np.testing.assert_allclose(energies["2"], energies["False"], rtol=1e-4)


def test_data_parallel_step_is_partitioned(multidevice):
    # The compiled 4-device step reduces across devices: the batch work really is split.
    assert multidevice["all_reduces"] > 0


def test_indivisible_batch_is_a_clear_error(multidevice):
    msg = multidevice["indivisible_error"]
    assert msg is not None
    assert "batch_size 66 is not divisible by the 4 devices" in msg
    assert "multiple of 4" in msg and "64 or 68" in msg


def test_too_many_devices_requested(multidevice):
    msg = multidevice["too_many_error"]
    assert msg is not None and "asked for 5 devices but 4 are available" in msg


def test_mesh_validation_in_process():
    mesh = data_parallel_mesh()
    assert mesh.axis_names == ("data",) and mesh.size == len(jax.devices())
    check_batch_divisible(7, data_parallel_mesh(1))  # one device divides anything
    other = Mesh(np.asarray(jax.devices()), ("batch",))
    with pytest.raises(ValueError, match="not the data axis 'data'"):
        check_batch_divisible(8, other)
    with pytest.raises(ValueError, match="not the data axis"):
        batch_sharding(other)
    with pytest.raises(ValueError, match="asked for 0 devices"):
        data_parallel_mesh(0)
