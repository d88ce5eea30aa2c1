"""Time every Laplacian method of ``nestedlora_jax.laplacians`` on the networks the solver uses.

Milliseconds per batch (jit-compiled, ``block_until_ready``, compile/warm-up excluded, median of
``--repeats`` calls) of ``batched_laplacian(fn, xs, method=m, return_grad=True)``, i.e. value,
gradient and Laplacian together, as the operator code needs them. Two network shapes, written
here in plain JAX, with their parameters passed as jit arguments (as in a training step):

- ``shared``: one MLP ``d -> 64 -> 64 -> 64 -> L`` (softplus);
- ``vmapped``: L independent MLPs ``d -> 32 -> 32 -> 32 -> 1`` (softplus), parameters stacked on a
  leading axis and evaluated with ``jax.vmap`` over them.

Usage::

    python benchmarks/laplacian.py [--batch 512] [--dims 2 3 6 12 24 48] [--outputs 1 16]
                                   [--repeats 7] [--probes 8] [--out benchmarks/results]
    python benchmarks/laplacian.py --markdown-only   # rebuild the table from the saved JSON

Writes ``laplacian.json`` (all timings, machine info, load averages) and ``laplacian.md`` (a table)
to ``--out``. A method whose single call takes more than 20 s (measured, or extrapolated as d^1.5
from the previous d) is recorded as null. Timings on shared machines are noisy: compare within
one run, and look at the recorded load average and interquartile range.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from nestedlora_jax.run_folder import positive_int

from nestedlora_jax.laplacians import (
    DEFAULT_LAPLACIAN_METHOD,
    EXACT_LAPLACIAN_METHODS,
    batched_laplacian,
)

MAX_SECONDS = 20.0
METHODS = EXACT_LAPLACIAN_METHODS + ("hutchinson", "finite_difference")


def init_mlp(key, sizes, dtype=jnp.float32):
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        key, sub = jax.random.split(key)
        w = jax.random.normal(sub, (fan_in, fan_out), dtype) / np.sqrt(fan_in)
        params.append((w, jnp.zeros((fan_out,), dtype)))
    return params


def mlp(params, x):
    for w, b in params[:-1]:
        x = jax.nn.softplus(x @ w + b)
    w, b = params[-1]
    return x @ w + b


def make_network(kind, d, num_outputs, key):
    """Returns (params, fn) with fn(params, x) of shape (num_outputs,) for one point x (d,)."""
    if kind == "shared":
        return init_mlp(key, [d, 64, 64, 64, num_outputs]), mlp
    keys = jax.random.split(key, num_outputs)
    params = jax.vmap(lambda k: init_mlp(k, [d, 32, 32, 32, 1]))(keys)

    def vmapped(params, x):
        return jax.vmap(lambda p: mlp(p, x)[0])(params)

    return params, vmapped


def time_method(fn, params, xs, method, probes, repeats):
    kwargs = {"method": method, "return_grad": True}
    if method == "hutchinson":
        kwargs.update(key=jax.random.key(0), num_probes=probes)

    @jax.jit
    def run(params, xs):
        return batched_laplacian(partial(fn, params), xs, **kwargs)

    start = time.perf_counter()
    jax.block_until_ready(run(params, xs))
    first = time.perf_counter() - start
    # One more untimed call: the first one includes compilation and allocation.
    start = time.perf_counter()
    jax.block_until_ready(run(params, xs))
    second = time.perf_counter() - start
    if second > MAX_SECONDS:
        return None
    n = repeats if second < 1.0 else max(3, repeats // 3)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        jax.block_until_ready(run(params, xs))
        times.append(time.perf_counter() - start)
    q = np.percentile(times, [25, 75])
    return {
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "p25_ms": 1e3 * q[0],
        "p75_ms": 1e3 * q[1],
        "repeats": n,
        "first_call_s": first,
    }


def markdown_table(results, dims, outputs, batch, probes):
    lines = [
        f"ms per batch of {batch} (value + gradient + Laplacian, float32, median); "
        f"hutchinson uses {probes} Rademacher probes; **bold** = fastest exact method for that "
        "network, L and d; - = not run (> 20 s).",
        "",
        "| network | L | method | " + " | ".join(f"d={d}" for d in dims) + " |",
        "|---|---|---|" + "---|" * len(dims),
    ]
    for kind in ("shared", "vmapped"):
        for num_outputs in outputs:
            best = {}
            for d in dims:
                exact = [
                    (r["median_ms"], r["method"])
                    for r in results
                    if r["network"] == kind and r["L"] == num_outputs and r["d"] == d
                    and r["method"] in EXACT_LAPLACIAN_METHODS and r["median_ms"] is not None
                ]
                best[d] = min(exact)[1] if exact else None
            for method in METHODS:
                cells = []
                for d in dims:
                    row = [
                        r for r in results
                        if r["network"] == kind and r["L"] == num_outputs and r["d"] == d
                        and r["method"] == method
                    ]
                    if not row or row[0]["median_ms"] is None:
                        cells.append("-")
                        continue
                    cell = f"{row[0]['median_ms']:.3g}"
                    cells.append(f"**{cell}**" if best[d] == method else cell)
                lines.append(f"| {kind} | {num_outputs} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cpu_model():
    """platform.processor() is often empty on Linux; /proc/cpuinfo names the CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=positive_int, default=512)
    parser.add_argument("--dims", type=positive_int, nargs="+", default=[2, 3, 6, 12, 24, 48])
    parser.add_argument("--outputs", type=positive_int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=positive_int, default=7)
    parser.add_argument("--probes", type=positive_int, default=8, help="num_probes for hutchinson")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument(
        "--markdown-only",
        action="store_true",
        help="rebuild laplacian.md from --out/laplacian.json",
    )
    args = parser.parse_args()
    if args.markdown_only:
        with open(os.path.join(args.out, "laplacian.json")) as f:
            print(write_markdown(json.load(f), os.path.join(args.out, "laplacian.md")))
        return

    machine = {
        "processor": platform.processor(),
        "cpu_model": cpu_model(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "device": str(jax.devices()[0]),
        "load_average_start": os.getloadavg(),
    }
    print(f"machine: {machine}")
    print(
        f"{'network':8s} {'L':>3s} {'d':>3s} {'method':22s} {'median ms':>10s} {'IQR ms':>14s} "
        f"{'1st call s':>10s}"
    )
    results = []
    started = time.perf_counter()
    for kind in ("shared", "vmapped"):
        for num_outputs in args.outputs:
            previous = {}
            for d in args.dims:
                params, fn = make_network(kind, d, num_outputs, jax.random.key(d))
                xs = jax.random.normal(jax.random.key(1), (args.batch, d), jnp.float32)
                for method in METHODS:
                    prev = previous.get(method)
                    if prev is None and method in previous:
                        timing = None  # already too slow at a smaller d
                    elif prev is not None and prev[1] * 1e-3 * (d / prev[0]) ** 1.5 > MAX_SECONDS:
                        timing = None
                    else:
                        timing = time_method(fn, params, xs, method, args.probes, args.repeats)
                    previous[method] = None if timing is None else (d, timing["median_ms"])
                    row = {"network": kind, "L": num_outputs, "d": d, "method": method}
                    row.update(timing or {"median_ms": None})
                    results.append(row)
                    if timing is None:
                        print(f"{kind:8s} {num_outputs:3d} {d:3d} {method:22s} {'null':>10s}")
                    else:
                        iqr = f"{timing['p25_ms']:.3g}-{timing['p75_ms']:.3g}"
                        print(
                            f"{kind:8s} {num_outputs:3d} {d:3d} {method:22s} "
                            f"{timing['median_ms']:10.3f} {iqr:>14s} {timing['first_call_s']:10.2f}"
                        )
    machine["load_average_end"] = os.getloadavg()
    machine["total_seconds"] = time.perf_counter() - started

    os.makedirs(args.out, exist_ok=True)
    payload = {
        "description": "ms per batch for batched_laplacian(..., return_grad=True), float32",
        "batch": args.batch,
        "hutchinson_num_probes": args.probes,
        "default_method": DEFAULT_LAPLACIAN_METHOD,
        "machine": machine,
        "results": results,
    }
    with open(os.path.join(args.out, "laplacian.json"), "w") as f:
        json.dump(payload, f, indent=1)
    table = write_markdown(payload, os.path.join(args.out, "laplacian.md"))
    print()
    print(table)
    print(f"total {machine['total_seconds']:.0f} s; written to {args.out}/laplacian.{{json,md}}")


def write_markdown(payload, path):
    """The markdown report of a run (also rebuilt from its JSON with --markdown-only)."""
    results, machine = payload["results"], payload["machine"]
    dims = sorted({r["d"] for r in results})
    outputs = sorted({r["L"] for r in results})
    batch, probes = payload["batch"], payload["hutchinson_num_probes"]
    table = markdown_table(results, dims, outputs, batch, probes)
    spreads = [
        (r["p75_ms"] - r["p25_ms"]) / r["median_ms"] for r in results if r["median_ms"] is not None
    ]
    load = (machine["load_average_start"][0], machine["load_average_end"][0])
    shared = max(load) > machine["cpu_count"]
    with open(path, "w") as f:
        f.write("# Laplacian methods: timings\n\n")
        f.write(
            f"Machine: {machine.get('cpu_model') or machine['processor'] or machine['machine']}, "
            f"{machine['cpu_count']} CPUs, {machine['device']}, jax {machine['jax_version']}; "
            f"{machine['total_seconds']:.0f} s in all. Load average {load[0]:.2f} at start, "
            f"{load[1]:.2f} at end{' (above the CPU count: other jobs shared the CPUs)' * shared}. "
            f"Noise: the interquartile range of the repeats is "
            f"{100 * statistics.median(spreads):.0f} % of the median (median over rows), up to "
            f"{100 * max(spreads):.0f} %. Compare methods within a column, not across runs. "
            f"`\"default\"` = `{payload['default_method']}`.\n\n"
        )
        f.write(table)
    return table


if __name__ == "__main__":
    main()
