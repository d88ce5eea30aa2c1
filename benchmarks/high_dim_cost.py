"""Cost growth with dimension: training steps/s and peak memory of ``fit``'s step vs d.

What it measures. For ``CoupledOscillator(dim=d)`` (its default sampler and operator scaling) and
each d in ``--dims`` (default 2 5 10 20 50 100), at fixed L (``--states``, default 8), fixed
network (``solve``'s default: ``default_network(problem, L)`` = L parallel 3 x 32 softplus MLPs,
made pure with ``networks.to_apply``) and batch 512, it times the compiled training step that
``fit`` runs (``make_loss_fn`` + ``make_train_step`` with ``default_optimizer``, jitted as a
``train_steps`` scan over a chunk of steps), for two Laplacians:

- ``default``: the exact default method (folx forward Laplacian);
- ``hutchinson``: the stochastic Rademacher estimator with ``--probes`` probes (default 8); the
  operator takes a ``key``, and ``make_loss_fn`` gives it one key per point, as in ``fit``.

Each (d, method) configuration runs in its own fresh subprocess, so that its peak resident
memory (``ru_maxrss``) is its own; a child running past ``--timeout`` seconds (default 300) is
killed and recorded as ``"timeout"`` and the others still run. In the child: build, compile
(``lower`` + ``compile``, timed apart from running), two warm-up chunks, then ``--repeats``
(default 3) timed repeats of k chunks each, k chosen so that all repeats together take at
least ``--min-time`` seconds (default 3; or a fixed ``--steps`` per repeat), each ended with
``jax.block_until_ready``; ms/step is the median over the repeats. Reported per row: d,
method, steps/s, ms/step (median, min, max over repeats), compile seconds, peak RSS MiB at the
end and before compilation (the baseline: interpreter, JAX, the built network and state),
device peak memory where the backend reports it (GPUs; not CPUs), parameter count.

Usage::

    python benchmarks/high_dim_cost.py                   # the full measurement (run it alone)
    python benchmarks/high_dim_cost.py --quick           # smoke test: d = 2, 5, a few steps
    python benchmarks/high_dim_cost.py --dims 2 10 50 --methods hutchinson --min-time 5
    python benchmarks/high_dim_cost.py --markdown-only   # rebuild table/figure from the JSON

Writes to ``--out`` (default ``results/high_dim_cost``): ``results.json`` (every row, the
configuration, the machine from ``hydrogen_benchmark._environment()``, load averages, the growth
exponents), and unless ``--no-figures`` ``cost_growth.png`` (ms/step and peak RSS vs d, log-log,
one line per method) and ``cost_growth.md`` (a table). At the end it prints, per method, the
least-squares slope ``a`` of log(ms/step) against log(d) over d >= 5 ("time grows like d^a").

Timings on shared machines are meaningless: run it with nothing else on the CPUs (the load
average at start and end is recorded to check).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

from nestedlora_jax.run_folder import positive_float, positive_int, seed_int

METHODS = ("default", "hutchinson")
DEFAULT_DIMS = (2, 5, 10, 20, 50, 100)
# The exponent fit starts at d = 5: at d = 2 fixed per-step costs (sampling, the optimizer,
# dispatch) still dominate and would flatten the slope.
FIT_MIN_DIM = 5
# The child prints its result on one line with this prefix; everything else it prints (JAX
# warnings, folx fallbacks) is ignored by the parent.
RESULT_PREFIX = "HIGH_DIM_COST_RESULT "


# --------------------------------------------------------------------------- child: one measurement


def _rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (``ru_maxrss`` is KiB on Linux)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # macOS reports bytes; the benchmark targets Linux, but keep the number sane elsewhere.
    return kib / (1024.0 * 1024.0) if sys.platform == "darwin" else kib / 1024.0


def build_step(d: int, method: str, L: int, batch: int, probes: int, seed: int, chunk: int):
    """The pieces ``solve`` + ``fit`` build for ``CoupledOscillator(dim=d)``, ready to compile.

    Mirrors ``solver._build`` (objective of ``"neuralsvd-seq"``, ``problem_operator``,
    ``default_network`` + ``to_apply``) except that ``num_probes`` reaches ``problem_operator``
    (``_build`` does not pass it), then ``fit``'s ``make_loss_fn`` / ``make_train_step`` /
    ``init_train_state`` and its jitted ``train_steps`` chunk. Returns ``(run_chunk, state,
    info)``: ``run_chunk(state, num)`` jitted with ``num`` static, as in ``fit``.
    """
    import jax

    from nestedlora_jax.networks import to_apply
    from nestedlora_jax.operators import _accepts_key, problem_operator
    from nestedlora_jax.problems import CoupledOscillator
    from nestedlora_jax.solver import default_network, make_objective
    from nestedlora_jax.training import (
        default_optimizer,
        init_train_state,
        make_loss_fn,
        make_train_step,
        train_steps,
    )

    problem = CoupledOscillator(dim=d)
    objective = make_objective("neuralsvd-seq")  # solve's default method
    operator = problem_operator(
        problem, L, laplacian_method=method, num_probes=probes if method == "hutchinson" else None
    )
    apply, params = to_apply(default_network(problem, L, seed=seed))
    # solve's default: steps=20000, learning_rate=3e-3; the schedule's length does not change
    # the cost of a step.
    optimizer = default_optimizer(20000, 3e-3)
    loss_fn = make_loss_fn(apply, operator.op, objective)
    step_fn = make_train_step(loss_fn, optimizer, operator.sampler.sample, batch, ema_decay=0.999)
    state = init_train_state(params, optimizer, L, objective)
    base_key = jax.random.PRNGKey(seed)
    run_chunk = jax.jit(lambda state, num: train_steps(step_fn, state, base_key, num), static_argnums=1)
    info = {
        "param_count": int(sum(np.size(p) for p in jax.tree_util.tree_leaves(params))),
        "operator_takes_key": _accepts_key(operator.op),
        "chunk": chunk,
    }
    return run_chunk, state, info


def _device_peak_mib():
    """Peak device memory in use, MiB, where the backend reports it (GPU/TPU; None on CPU)."""
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # not every backend implements it
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**20


def measure(config: dict) -> dict:
    """One (d, method) measurement in this process; see the module docstring for the protocol."""
    rss_start = _rss_mib()
    import jax

    d, method, chunk = config["d"], config["method"], config["chunk"]
    run_chunk, state, info = build_step(
        d, method, config["states"], config["batch"], config["probes"], config["seed"], chunk
    )
    jax.block_until_ready(state)
    rss_before_compile = _rss_mib()

    t0 = time.perf_counter()
    lowered = run_chunk.lower(state, chunk)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()

    # Warm-up: the first execution pays allocation and first-touch costs; the second one
    # estimates the time of a chunk, from which the number of timed chunks is chosen.
    state = jax.block_until_ready(compiled(state))
    t3 = time.perf_counter()
    state = jax.block_until_ready(compiled(state))
    chunk_s = time.perf_counter() - t3
    repeats = config["repeats"]
    if config.get("steps"):
        chunks_per_repeat = max(1, math.ceil(config["steps"] / chunk))
    else:
        chunks_per_repeat = max(1, math.ceil(config["min_time"] / (repeats * max(chunk_s, 1e-9))))
    steps_per_repeat = chunks_per_repeat * chunk

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(chunks_per_repeat):
            state = compiled(state)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
    ms = [1e3 * t / steps_per_repeat for t in times]
    median_ms = statistics.median(ms)
    return {
        "d": d,
        "method": method,
        "status": "ok",
        "steps_per_s": 1e3 / median_ms,
        "ms_per_step": median_ms,
        "ms_per_step_min": min(ms),
        "ms_per_step_max": max(ms),
        "compile_s": t2 - t0,
        "trace_lower_s": t1 - t0,
        "xla_compile_s": t2 - t1,
        "first_chunk_s": t3 - t2,
        "peak_rss_mib": _rss_mib(),
        "rss_before_compile_mib": rss_before_compile,
        "rss_at_start_mib": rss_start,
        "device_peak_mib": _device_peak_mib(),
        "repeats": repeats,
        "steps_per_repeat": steps_per_repeat,
        "timed_steps": repeats * steps_per_repeat,
        "timed_s": sum(times),
        "bad_steps": int(state.bad_steps),
        "num_probes": config["probes"] if method == "hutchinson" else None,
        **info,
    }


def _child_main(config_json: str) -> None:
    """Entry point of a child process: measure, then print the result on one tagged line."""
    result = measure(json.loads(config_json))
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- parent: the sweep


def run_config(config: dict, timeout: float) -> dict:
    """Run :func:`measure` for one configuration in a fresh subprocess; kill it after ``timeout``.

    Returns the child's row, or a row with ``status`` ``"timeout"`` or ``"error"`` (with the
    tail of its output) so the sweep can go on.
    """
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(config)]
    row = {"d": config["d"], "method": config["method"]}
    start = time.perf_counter()
    try:
        # subprocess.run kills the child (SIGKILL) on timeout before raising.
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "status": "timeout", "timeout_s": timeout, "wall_s": time.perf_counter() - start}
    wall = time.perf_counter() - start
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return {**json.loads(line[len(RESULT_PREFIX):]), "wall_s": wall}
    tail = (proc.stdout + proc.stderr)[-2000:]
    # rc -9 without a timeout is usually the kernel's OOM killer: worth saying in the row.
    return {**row, "status": "error", "returncode": proc.returncode, "output_tail": tail, "wall_s": wall}


def growth_exponents(rows, min_dim: int = FIT_MIN_DIM) -> dict:
    """Per method: least-squares slope of log(ms/step) vs log(d) over successful rows, d >= min_dim.

    ``None`` where fewer than two dimensions qualify.
    """
    out = {}
    for method in sorted({r["method"] for r in rows}):
        pts = sorted(
            (r["d"], r["ms_per_step"]) for r in rows
            if r["method"] == method and r.get("status") == "ok" and r["d"] >= min_dim
        )
        if len({d for d, _ in pts}) < 2:
            out[method] = {"exponent": None, "dims": [d for d, _ in pts]}
            continue
        x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
        slope, intercept = np.polyfit(x, y, 1)
        out[method] = {
            "exponent": float(slope),
            "prefactor_ms": float(np.exp(intercept)),  # ms/step ~ prefactor * d^exponent
            "dims": [p[0] for p in pts],
        }
    return out


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def markdown_table(payload: dict) -> str:
    """The markdown report of a run: one row per (method, d), then the growth exponents."""
    cfg, env = payload["config"], payload["environment"]
    load = payload["load_average"]
    lines = [
        "# Cost growth with dimension: CoupledOscillator(d), NestedLoRA training step",
        "",
        f"L = {cfg['states']}, batch {cfg['batch']}, network: L parallel 3 x 32 softplus MLPs "
        f"(`default_network`), `fit`'s step (`train_steps` chunks of {cfg['chunk']}), "
        f"hutchinson with {cfg['probes']} probes. Machine: {env.get('device')}, "
        f"{env.get('cpu_count')} CPUs, jax {env.get('jax')}; load average {load['start'][0]:.2f} "
        f"at start, {load['end'][0]:.2f} at end. ms/step = median of {cfg['repeats']} repeats; "
        "peak RSS = `ru_maxrss` of the configuration's own process (baseline: before compilation).",
        "",
        "| method | d | status | steps/s | ms/step | compile s | peak RSS MiB | baseline RSS MiB | device peak MiB | params |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(payload["rows"], key=lambda r: (r["method"], r["d"])):
        lines.append(
            f"| {r['method']} | {r['d']} | {r['status']} | {_fmt(r.get('steps_per_s'), '.3g')} | "
            f"{_fmt(r.get('ms_per_step'), '.3g')} | {_fmt(r.get('compile_s'), '.3g')} | "
            f"{_fmt(r.get('peak_rss_mib'), '.0f')} | {_fmt(r.get('rss_before_compile_mib'), '.0f')} | "
            f"{_fmt(r.get('device_peak_mib'), '.0f')} | {_fmt(r.get('param_count'), 'd')} |"
        )
    lines.append("")
    for method, g in payload["growth_exponents"].items():
        if g["exponent"] is None:
            lines.append(f"- {method}: too few dimensions >= {FIT_MIN_DIM} for a growth exponent.")
        else:
            lines.append(
                f"- {method}: time per step grows like d^{g['exponent']:.2f} "
                f"(least squares over d = {', '.join(map(str, g['dims']))})."
            )
    return "\n".join(lines) + "\n"


def make_figure(payload: dict, path: str) -> None:
    """``cost_growth.png``: ms/step and peak RSS vs d, log-log, one line per method."""
    import matplotlib

    matplotlib.use("Agg")  # no display on benchmark machines
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")  # "20", not matplotlib's "2 x 10^1"
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in sorted({r["method"] for r in payload["rows"]}):
        ok = sorted((r for r in payload["rows"] if r["method"] == method and r["status"] == "ok"),
                    key=lambda r: r["d"])
        if not ok:
            continue
        ds = [r["d"] for r in ok]
        g = payload["growth_exponents"].get(method, {}).get("exponent")
        label = method if g is None else f"{method} (~ d^{g:.2f})"
        axes[0].plot(ds, [r["ms_per_step"] for r in ok], "o-", label=label)
        axes[1].plot(ds, [r["peak_rss_mib"] for r in ok], "o-", label=method)
    cfg = payload["config"]
    dims = sorted({r["d"] for r in payload["rows"]})
    for ax, ylabel in zip(axes, ("ms per training step", "peak RSS (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(dims)
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(plain)
        lo, hi = ax.get_ylim()
        # Label the minor ticks only over a short range, where there are few major ones.
        ax.yaxis.set_minor_formatter(plain if hi / lo < 30 else NullFormatter())
        ax.set_xlabel("dimension d")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"CoupledOscillator(d), L = {cfg['states']}, batch {cfg['batch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    """The command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", type=positive_int, nargs="+", default=None, help="dimensions (default 2 5 10 20 50 100)")
    p.add_argument("--states", type=positive_int, default=8, help="number of states L")
    p.add_argument("--batch", type=positive_int, default=512)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--probes", type=positive_int, default=8, help="num_probes for hutchinson")
    p.add_argument("--min-time", type=positive_float, default=None,
                   help="seconds of timed steps per configuration, over all repeats (default 3)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="fixed steps per repeat instead of --min-time (rounded up to chunks)")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--chunk", type=positive_int, default=None,
                   help="steps per jitted train_steps scan (default 10)")
    p.add_argument("--timeout", type=positive_float, default=300.0, help="seconds before a child is killed")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--out", default="results/high_dim_cost")
    p.add_argument("--quick", action="store_true", help="tiny run for a smoke test: d = 2, 5, few steps")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--markdown-only", action="store_true",
                   help="rebuild cost_growth.md (and the figure) from --out/results.json")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one measurement
    return p


def _resolve_defaults(args) -> None:
    """Fill the options left unset, with the --quick values when asked."""
    if args.dims is None:
        args.dims = [2, 5] if args.quick else list(DEFAULT_DIMS)
    if args.min_time is None:
        args.min_time = 0.2 if args.quick else 3.0
    if args.chunk is None:
        args.chunk = 2 if args.quick else 10
    if args.quick and args.steps is None:
        args.steps = 4


def _write_reports(payload: dict, out: str, figures: bool) -> str:
    """Write ``cost_growth.md`` and (with ``figures``) ``cost_growth.png``; returns the table."""
    table = markdown_table(payload)
    with open(os.path.join(out, "cost_growth.md"), "w") as fh:
        fh.write(table)
    if figures:
        make_figure(payload, os.path.join(out, "cost_growth.png"))
    return table


def main(argv=None) -> dict | None:
    """Run the sweep (each configuration in its own subprocess) and write the reports.

    Returns the payload written to ``results.json``.
    """
    args = build_parser().parse_args(argv)
    if args.child is not None:
        _child_main(args.child)
        return None
    if args.markdown_only:
        with open(os.path.join(args.out, "results.json")) as fh:
            payload = json.load(fh)
        # Rows may have been merged from several runs: refit the growth from them.
        payload["growth_exponents"] = growth_exponents(payload["rows"])
        print(_write_reports(payload, args.out, not args.no_figures))
        return payload
    _resolve_defaults(args)
    os.makedirs(args.out, exist_ok=True)

    from nestedlora_jax._io import write_json_atomic

    config = {
        "problem": "CoupledOscillator(dim=d), default sampler and operator scaling",
        "dims": args.dims,
        "methods": args.methods,
        "states": args.states,
        "batch": args.batch,
        "probes": args.probes,
        "min_time": args.min_time,
        "steps": args.steps,
        "repeats": args.repeats,
        "chunk": args.chunk,
        "timeout": args.timeout,
        "seed": args.seed,
        "objective": "neuralsvd-seq",
        "optimizer": "default_optimizer(20000, 3e-3)",
        "network": "default_network(problem, L): L parallel 3 x 32 softplus MLPs",
    }
    load_start = os.getloadavg()
    print(f"{'method':10s} {'d':>4s} {'status':>7s} {'steps/s':>9s} {'ms/step':>9s} "
          f"{'compile s':>9s} {'RSS MiB':>8s} {'base MiB':>8s} {'params':>7s}", flush=True)
    rows = []
    started = time.perf_counter()
    for method in args.methods:
        for d in args.dims:
            child = {k: config[k] for k in ("states", "batch", "probes", "min_time", "steps",
                                            "repeats", "chunk", "seed")}
            row = run_config({**child, "d": d, "method": method}, args.timeout)
            rows.append(row)
            if row["status"] == "ok":
                print(f"{method:10s} {d:4d} {'ok':>7s} {row['steps_per_s']:9.3g} "
                      f"{row['ms_per_step']:9.3g} {row['compile_s']:9.3g} "
                      f"{row['peak_rss_mib']:8.0f} {row['rss_before_compile_mib']:8.0f} "
                      f"{row['param_count']:7d}", flush=True)
            else:
                print(f"{method:10s} {d:4d} {row['status']:>7s}", flush=True)
                if row["status"] == "error":
                    print(row["output_tail"], file=sys.stderr)

    # The machine is recorded only now: in the parent, initialising the JAX backend earlier would
    # (on a GPU) pre-allocate device memory that the children then could not get.
    from nestedlora_jax.hydrogen_benchmark import _environment

    payload = {
        "description": "training steps/s and peak memory of fit's step vs dimension d",
        "config": config,
        "environment": _environment(),
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "total_seconds": time.perf_counter() - started,
        "rows": rows,
        "growth_exponents": growth_exponents(rows),
    }
    write_json_atomic(os.path.join(args.out, "results.json"), payload)
    table = _write_reports(payload, args.out, not args.no_figures)
    print()
    print(table)
    for method, g in payload["growth_exponents"].items():
        if g["exponent"] is not None:
            print(f"{method}: time per step grows like d^{g['exponent']:.2f} "
                  f"(d = {', '.join(map(str, g['dims']))})")
        else:
            print(f"{method}: too few successful dimensions >= {FIT_MIN_DIM} for an exponent")
    print(f"total {payload['total_seconds']:.0f} s; written to {args.out}")
    return payload


if __name__ == "__main__":
    main()
