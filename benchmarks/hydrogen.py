"""2-D hydrogen benchmark; see ``nestedlora_jax/hydrogen_benchmark.py`` or ``--help``.

    python benchmarks/hydrogen.py --method neuralsvd-seq --states 16 --steps 100000 \
        --batch 512 --seed 0 --out results/hydrogen
"""
from nestedlora_jax.hydrogen_benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
