"""The old name of ``clip_interpret.engine`` (where the work over a run's shards runs), kept so
that code importing ``clip_interpret.cluster`` goes on working for a release; import
``clip_interpret.engine`` instead."""

from .engine import (  # noqa: F401
    Engine,
    check_reachable,
    map_shards,
    one_session,
    raise_cause,
    ray_session,
    require_ray,
    resolve_engine,
    worker_count,
)
