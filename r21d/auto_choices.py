"""What ``auto`` runs on a GPU, per conv family: backends in order of preference.

Only committed benchmark results (benchmarks/results/) may put a backend first here, and a csrc
('cuda') kernel is listed only after it passed its GPU tests on a real GPU (docs/architecture.md,
Backends). No GPU results are committed yet, so every family uses the default: the Triton kernels.
"""

DEFAULT_ORDER: tuple[str, ...] = ("triton",)

# family -> backends, fastest first; add an entry with the results file that justifies it.
AUTO_ORDER: dict[str, tuple[str, ...]] = {}


def preferred(family: str) -> tuple[str, ...]:
    return AUTO_ORDER.get(family, DEFAULT_ORDER)
