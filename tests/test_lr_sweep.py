"""``benchmarks/hydrogen_lr_sweep.py``: one real row at a tiny size, the pick per method, and
the resume contract (rows already written are not re-run; another setting is refused)."""
import json
import pathlib

import pytest

from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def sweep():
    return load_benchmark("hydrogen_lr_sweep")


TINY = ["--states", "4", "--batch", "64", "--steps", "10", "--grid", "40"]


def test_a_row_runs_the_benchmark_with_the_swept_rate_and_the_tables_settings(sweep, monkeypatch):
    seen = {}
    metrics = {k: 0.1 for k in sweep.KEYS} | {"rel_error": [0.1, 0.2]}

    def fake_run(args):
        seen.update(vars(args))
        return {"per_seed": [{"metrics": metrics, "reinitialized": [], "bad_steps": 0,
                              "train_time_s": 1.0}]}

    monkeypatch.setattr(sweep, "run", fake_run)
    args = sweep.argparse.Namespace(states=9, steps=20000, batch=512, seed=3, grid=300)
    row = sweep.sweep_row("neuralef", 3e-4, args)
    assert {k: seen[k] for k in ("method", "states", "steps", "batch", "seed", "grid", "lr")} == {
        "method": "neuralef", "states": 9, "steps": 20000, "batch": 512, "seed": 3, "grid": 300,
        "lr": 3e-4}
    # Everything not swept is the benchmark's default (networks, sampler, scaling, remedy).
    assert seen["hidden"] is None and seen["network_length"] is None
    assert not seen["no_collapse_remedy"] and seen["guard_functions"] == 0
    assert row == {"method": "neuralef", "lr": 3e-4, **metrics, "reinitialized": [],
                   "bad_steps": 0, "train_time_s": 1.0}


@pytest.mark.slow
def test_a_real_row_carries_the_benchmarks_metrics(sweep, tmp_path):
    out = tmp_path / "sweep.json"
    sweep.main(TINY + ["--methods", "neuralsvd-seq", "--rates", "1e-3", "--out", str(out)])
    record = json.loads(out.read_text())
    (row,) = record["rows"]
    assert row["method"] == "neuralsvd-seq" and row["lr"] == 1e-3
    assert 0 < row["mean_rel_error"] <= row["max_rel_error"] == max(row["rel_error"])
    assert len(row["rel_error"]) == 4
    assert 0 <= row["subspace_distance_mean"] <= 1
    assert record["setting"] == {"states": 4, "batch": 64, "steps": 10, "seed": 0, "grid": 40}
    assert record["best_rate"] == {"neuralsvd-seq": 1e-3}


def test_the_pick_is_the_lowest_error_and_a_rerun_skips_written_rows(sweep, tmp_path, monkeypatch):
    a, b = "neuralsvd-seq", "neuralef"
    errors = {(a, 1e-3): 0.5, (a, 1e-4): 0.2, (b, 1e-3): 0.1, (b, 1e-4): 0.3}
    calls = []

    def fake_row(method, lr, args):
        calls.append((method, lr))
        return {"method": method, "lr": lr, "mean_rel_error": errors[method, lr],
                "subspace_distance_mean": 0.0}

    monkeypatch.setattr(sweep, "sweep_row", fake_row)
    out = str(tmp_path / "sweep.json")
    argv = TINY + ["--methods", a, b, "--out", out, "--rates"]
    sweep.main(argv + ["1e-3"])
    assert calls == [(a, 1e-3), (b, 1e-3)]
    sweep.main(argv + ["1e-3", "1e-4"])  # only the new rate runs
    assert calls[2:] == [(a, 1e-4), (b, 1e-4)]
    assert json.loads(pathlib.Path(out).read_text())["best_rate"] == {a: 1e-4, b: 1e-3}
    with pytest.raises(SystemExit) as exc:  # a different setting does not mix into the file
        sweep.main(["--steps", "20"] + argv[2:] + ["1e-3"])
    assert exc.value.code == 2
    sweep.main(argv + ["1e-3", "--overwrite"])
    assert calls[4:] == [(a, 1e-3), (b, 1e-3)]
    assert len(json.loads(pathlib.Path(out).read_text())["rows"]) == 2
    with pytest.raises(SystemExit):  # an unknown method or a rate <= 0 is a usage error
        sweep.main(["--methods", "nope", "--out", out])
    with pytest.raises(SystemExit):
        sweep.main(["--rates", "0", "--out", out])
