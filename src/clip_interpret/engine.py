"""Engines: where the work over a run's shards runs.

``local`` runs it in this process. ``ray`` (the optional extra ``clip-interpret[ray]``)
hands it to a Ray cluster: indexing to actors that each hold the model once and
write whole shards (``runstore/distributed.py``); passes over a run (TextSpan
statistics, ablation, faithfulness) to tasks that each reduce a group of shards
to sums, which the driver adds up (``map_shards``). Same shards, same results,
whoever computes them.

Without an address (and without ``RAY_ADDRESS``) a local Ray is started for the
call and stopped after; a Ray already initialised in this process is used as it
is. An address that does not answer fails within seconds.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np

from .errors import ClipInterpretError

ENGINES = ("local", "ray")
CONNECT_TIMEOUT_S = 5.0
TASKS_PER_WORKER = 4  # shard groups per Ray worker in a pass: late groups balance the load


@dataclass(frozen=True)
class Engine:
    """``kind``: local or ray. For ray: the cluster ``address`` (None: a local Ray for the call),
    ``workers`` (Ray workers: indexing actors, or tasks at once in a pass; None: as many as fit),
    and each worker's ``gpus_per_worker`` and ``cpus_per_worker`` (an indexing actor's reading processes)."""

    kind: str = "local"
    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float = 0
    cpus_per_worker: float = 1


def resolve_engine(engine: str | Engine | None = None, address: str | None = None, workers: int | None = None,
                   gpus_per_worker: float = 0, cpus_per_worker: float = 1) -> Engine:
    """An engine name and its options -> ``Engine`` (an ``Engine`` is returned as it is).
    ``workers`` only counts for the ray engine (the local engine's reading processes are the caller's)."""
    if isinstance(engine, Engine):
        return engine
    kind = engine or "local"
    if kind not in ENGINES:
        raise ClipInterpretError(f"unknown engine {kind!r}; choose one of {', '.join(ENGINES)}")
    if kind == "local":
        if address or gpus_per_worker:
            raise ClipInterpretError("--ray-address and --gpus-per-worker need --engine ray")
        return Engine()
    require_ray()  # before any work: say which extra to install
    if workers is not None and workers < 1:
        raise ClipInterpretError(f"--workers must be at least 1 with --engine ray, got {workers}")
    if gpus_per_worker < 0 or cpus_per_worker <= 0:
        raise ClipInterpretError("--gpus-per-worker must be 0 or more and --cpus-per-worker more than 0")
    return Engine("ray", address, workers, float(gpus_per_worker), float(cpus_per_worker))


def require_ray():
    try:
        import ray
    except ImportError:
        raise ClipInterpretError("the ray engine needs Ray: pip install 'clip-interpret[ray]'") from None
    return ray


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail within ``timeout`` seconds, with the address named, when nothing answers there."""
    if address in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise ClipInterpretError(f"Ray address {address!r} is not HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        reason = "no answer" if isinstance(err, socket.timeout) else (err.strerror or str(err))
        raise ClipInterpretError(f"no Ray cluster answers at {address} ({reason} within {timeout:g} s); start one "
                                 "with `ray start --head` there, or check --ray-address") from None


@contextmanager
def ray_session(engine: Engine):
    """The ``ray`` module, connected: to a Ray already initialised here, to ``engine.address``
    (or ``RAY_ADDRESS``), or to a local Ray started now and stopped on exit."""
    from .device import cores

    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    address = engine.address or os.environ.get("RAY_ADDRESS") or "local"
    check_reachable(address)
    options = {"log_to_driver": False, "logging_level": logging.ERROR}
    if address == "local":
        options.update(num_cpus=cores(), include_dashboard=False)
    try:
        ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ClipInterpretError(f"cannot connect to the Ray cluster at {address}: {err}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def one_session(function):
    """Decorator: run ``function`` (its keyword ``engine`` says where) inside one Ray session when
    the engine is ray, so that its passes share one Ray instead of starting one each."""

    @functools.wraps(function)
    def call(*args, engine=None, **kwargs):
        engine = resolve_engine(engine)
        with ray_session(engine) if engine.kind == "ray" else nullcontext():
            return function(*args, engine=engine, **kwargs)

    return call


def worker_count(ray, engine: Engine) -> int:
    """How many workers to run: ``engine.workers``, or as many as the cluster's CPUs and GPUs fit;
    a number that cannot fit is refused (its workers would wait for resources for ever)."""
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    fit = int(cpus // engine.cpus_per_worker)
    if engine.gpus_per_worker:
        fit = min(fit, int(gpus // engine.gpus_per_worker))
    wanted = engine.workers or fit
    if wanted < 1 or wanted > fit:
        raise ClipInterpretError(
            f"the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs: {wanted or 1} worker(s) of "
            f"{engine.cpus_per_worker:g} CPU(s) and {engine.gpus_per_worker:g} GPU(s) do not fit; at most {fit} do "
            "(--workers, --cpus-per-worker, --gpus-per-worker)")
    return wanted


def raise_cause(ray, err: BaseException):
    """A Ray task's own error, as it was raised there (a ClipInterpretError keeps its message)."""
    cause = getattr(err, "cause", None)
    if isinstance(err, ray.exceptions.RayTaskError) and isinstance(cause, ClipInterpretError):
        raise cause from None
    raise err


def _add(total, part):
    """Sum nested tuples / dicts of arrays and numbers."""
    if total is None:
        return part
    if isinstance(part, dict):
        return {k: _add(total[k], v) for k, v in part.items()}
    if isinstance(part, tuple):
        return tuple(_add(t, p) for t, p in zip(total, part))
    return total + part


def _shard_task(reopen, path: str, fn, positions: list[int], gpu: bool, args: tuple):
    """One Ray task of ``map_shards``: ``fn`` over a group of the run's shards, the run opened
    from its path by ``reopen`` (the run's own class: the engine does not import the store)."""
    import torch

    device = torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")
    return fn(reopen(path, check_files=False), positions, device, *args)  # the driver checked its files


def map_shards(run, fn, args: tuple = (), device="cpu", engine: Engine | str | None = None):
    """The sum over the run's shards of ``fn(run, positions, device, *args)``: a nested tuple
    or dict of numpy arrays (on the host) for the shards at ``positions`` (indices into
    ``run.shards``; None: all of them).

    ``local``: one call over every shard, here on ``device``. ``ray``: tasks over groups of
    consecutive shards (each opens the run from its path, on a GPU when ``gpus_per_worker``),
    their sums added as they arrive: memory holds two partial sums, whatever the run's size.
    """
    engine = resolve_engine(engine)
    if engine.kind == "local" or not run.shards:
        return fn(run, None, device, *args)
    with ray_session(engine) as ray:
        n_workers = worker_count(ray, engine)
        groups = [g.tolist() for g in np.array_split(np.arange(len(run.shards)),
                                                     min(len(run.shards), TASKS_PER_WORKER * n_workers))]
        task = ray.remote(_shard_task).options(num_cpus=engine.cpus_per_worker, num_gpus=engine.gpus_per_worker)
        shared = ray.put(args)
        path = str(run.path.absolute())
        total, pending = None, []

        def collect(pending):
            nonlocal total
            done, pending = ray.wait(pending, num_returns=1)
            total = _add(total, ray.get(done[0]))
            return pending

        try:
            for group in groups:
                if len(pending) >= n_workers:
                    pending = collect(pending)
                pending.append(task.remote(type(run), path, fn, group, engine.gpus_per_worker > 0, shared))
            while pending:
                pending = collect(pending)
        except ray.exceptions.RayError as err:
            raise_cause(ray, err)
        return total
