"""Smoke test of ``benchmarks/high_dim_cost.py`` at a tiny size: one row per configuration,
positive rates and memory, reports written, a child past its time limit recorded as a timeout.

No timing threshold is asserted: the numbers depend on the machine and its load.
"""
import json
import math

import pytest

from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("high_dim_cost")


def test_tiny_sweep_writes_one_row_per_configuration(bench, tmp_path):
    out = tmp_path / "cost"
    payload = bench.main(["--dims", "2", "3", "--states", "2", "--batch", "32",
                          "--methods", "hutchinson", "--probes", "2",
                          "--steps", "4", "--chunk", "2", "--repeats", "2", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["rows"] == json.loads(json.dumps(payload["rows"]))
    rows = results["rows"]
    # One method keeps the suite short (each configuration starts a JAX process); the exact
    # Laplacian's path is the timeout test's.
    assert sorted((r["method"], r["d"]) for r in rows) == [("hutchinson", 2), ("hutchinson", 3)]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["steps_per_s"] > 0 and math.isfinite(r["steps_per_s"])
        assert r["ms_per_step"] > 0
        assert r["peak_rss_mib"] > 0
        assert r["peak_rss_mib"] >= r["rss_before_compile_mib"] > 0
        assert r["compile_s"] > 0
        assert r["timed_steps"] == 2 * 4
        assert r["param_count"] > 0
    # The stochastic operator gets its key (make_loss_fn passes one per point).
    assert all(r["operator_takes_key"] for r in rows)
    assert {r["num_probes"] for r in rows if r["method"] == "hutchinson"} == {2}
    # A parallel network of 2 MLPs d -> 32 -> 32 -> 32 -> 1 (plus any extra parameters of
    # the default network): one more input weight per MLP and dimension.
    by = {(r["method"], r["d"]): r for r in rows}
    assert by[("hutchinson", 3)]["param_count"] - by[("hutchinson", 2)]["param_count"] == 2 * 32
    assert results["environment"]["jax"]
    assert results["config"]["states"] == 2 and results["config"]["batch"] == 32
    # d >= 5 is needed for the exponent fit: none here, and that is reported, not an error.
    assert set(results["growth_exponents"]) == {"hutchinson"}
    assert (out / "cost_growth.md").read_text().count("| ok |") == 2
    assert (out / "cost_growth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_child_past_its_time_limit_is_a_timeout(bench, tmp_path):
    out = tmp_path / "slow"
    # One second is far less than importing JAX and compiling: the child must be killed.
    payload = bench.main(["--dims", "2", "--states", "2", "--batch", "32", "--methods", "default",
                          "--steps", "2", "--chunk", "2", "--timeout", "1", "--no-figures",
                          "--out", str(out)])
    assert [r["status"] for r in payload["rows"]] == ["timeout"]
    assert json.loads((out / "results.json").read_text())["rows"][0]["status"] == "timeout"
    assert not (out / "cost_growth.png").exists()


def test_growth_exponent_is_the_log_log_slope(bench):
    rows = [{"method": "m", "d": d, "status": "ok", "ms_per_step": 3.0 * d**1.5} for d in (2, 5, 10, 50)]
    rows.append({"method": "m", "d": 100, "status": "timeout"})
    g = bench.growth_exponents(rows)["m"]
    assert g["dims"] == [5, 10, 50]  # d = 2 excluded, the timeout skipped
    assert g["exponent"] == pytest.approx(1.5)
    assert g["prefactor_ms"] == pytest.approx(3.0)
