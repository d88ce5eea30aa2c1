"""High-dimensional benchmark; see ``nestedlora_jax/high_dim_benchmark.py`` or ``--help``.

    python benchmarks/high_dim.py --problem coupled-oscillator --dim 10 --states 32 \
        --steps 30000 --seeds 0 1 2
"""
from nestedlora_jax.high_dim_benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
