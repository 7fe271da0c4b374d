"""CPU threads per worker: the machine's cores shared among the launched models, as memory is.

llama.cpp and torch each take every core by default, so two busy models fight over them and both
crawl (chat fell from 51 to 20 tokens/s beside two rerank clients). Each worker gets a share of the
cores this process may run on (its CPU affinity, which honours taskset and container limits),
weighted by model type: generation holds the cores longest. An explicit `n_threads` launch option
wins and is taken out of the cores before the others are shared; RAGSERVE_THREADS in the server's
environment sets every other worker's count.

A worker's count is fixed when it starts: a model launched later shares the cores among all the
models present then, and workers already running keep theirs. `ragserve up` plans the whole stack
at once and launches each model with its share, so the order of launches does not matter there.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional

from ragserve.control.spec import ModelSpec, ModelType

THREADS_ENV = "RAGSERVE_THREADS"
THREADS_OPTION = "n_threads"
WEIGHTS = {ModelType.LLM: 2, ModelType.EMBEDDING: 1, ModelType.RERANK: 1}


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def explicit_threads(spec: ModelSpec) -> Optional[int]:
    """The `n_threads` launch option, when given; a value that is not a whole number >= 1 is an error."""
    value = spec.options.get(THREADS_OPTION)
    if value is None:
        return None
    if isinstance(value, bool) or not str(value).isdigit() or int(value) < 1:
        raise ValueError(f"launch option {THREADS_OPTION}={value!r} must be a whole number of threads, 1 or more")
    return int(value)


def env_threads() -> Optional[int]:
    """RAGSERVE_THREADS, the operator's count for every worker without its own, when set."""
    raw = os.environ.get(THREADS_ENV)
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{THREADS_ENV}={raw!r} must be a whole number of threads, 1 or more")
    return int(raw)


def plan_threads(specs: Iterable[ModelSpec], cores: Optional[int] = None) -> dict[str, int]:
    """Threads for each model (by uid) when all of `specs` run together on `cores` cores."""
    specs = list(specs)
    cores = cores or usable_cores()
    plan: dict[str, int] = {}
    shared: list[ModelSpec] = []
    fixed_for_all = env_threads()
    for spec in specs:
        fixed = explicit_threads(spec) or fixed_for_all
        if fixed:
            plan[spec.uid] = fixed
        else:
            shared.append(spec)
    left = max(1, cores - sum(plan.values()))
    total = sum(WEIGHTS[s.model_type] for s in shared)
    for spec in shared:
        # Rounded down so the shares never add up to more than the cores; every worker gets at least one.
        plan[spec.uid] = max(1, left * WEIGHTS[spec.model_type] // total)
    return plan
