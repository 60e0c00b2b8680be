"""Process pools for CPU-bound work (featurization, the synthetic dataset)."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor


def process_pool(workers: int | None) -> ProcessPoolExecutor:
    """`workers` processes (None: one per CPU) running one BLAS/OpenMP thread each, so N workers
    use N cores, not N² threads fighting over them."""
    return ProcessPoolExecutor(workers, initializer=_one_blas_thread)


def _one_blas_thread() -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
