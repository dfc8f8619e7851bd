"""The ray engine of ``index_images``: shards written by Ray actors.

Each actor (``ShardWorker``) holds the model once (on its GPU with
``gpus_per_worker``) and runs ``write_shards``, the local engine's own shard
function (handed over by ``index_images``), on the groups of shard numbers the driver hands it, with
``cpus_per_worker`` reading processes; so the shards are the same bytes whoever
writes them, and any later run resumes from them. The driver alone writes the
manifest and marks the run complete.

Before any work every actor proves that it sees the run folder (the token of the
driver's ``writer.lock``, and a file written into ``shards/``) and the images. An
actor that dies (killed, node lost) is replaced and the shards of its groups that
have no record yet are handed out again; nothing it left half-written counts.
"""

from __future__ import annotations

import copy
import json
import os
import socket
from collections import deque

from ..errors import ClipInterpretError
from .store import LOCK_NAME

IN_FLIGHT = 2  # groups queued per actor, so that it never waits for the driver
MAX_DEATHS = 3  # actor deaths per worker slot before the run stops


class ShardWorker:
    """A Ray actor: the model, held once, and the job; writes the shards it is given."""

    def __init__(self, parts: tuple, gpu: bool, readers: int, cwd: str):
        """``parts``: the job, the model's ViT and preprocessing, and the shard function."""
        import torch

        if os.path.isdir(cwd):
            os.chdir(cwd)  # relative image paths mean what they meant to the driver
        job, vit, preprocess, write_shards = parts
        self.job, self.preprocess, self.readers, self.write_shards = job, preprocess, readers, write_shards
        self.device = torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")
        self.gpu_missing = gpu and self.device.type == "cpu"
        self.vit = vit.to(self.device)

    def check(self, token: str) -> str | None:
        """None when this worker can do its job here, else what stops it (named)."""
        host = socket.gethostname()
        if self.gpu_missing:
            return f"the Ray worker on host {host} was given a GPU but torch sees none there"
        folder = self.job.out
        try:
            holder = json.loads((folder / LOCK_NAME).read_text())
        except (OSError, ValueError):
            holder = {}
        if holder.get("token") != token:
            return (f"a Ray worker on host {host} cannot see the run folder {folder} (it is not the folder the "
                    "driver writes); use a folder that every node shares (NFS or another shared file system) "
                    "at the same path")
        probe = folder / "shards" / f".probe-{host}-{os.getpid()}.tmp"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            return f"a Ray worker on host {host} cannot write into {folder / 'shards'}: {err.strerror or err}"
        where = self.job.source.location()
        if where is not None and not os.path.exists(where):
            return (f"a Ray worker on host {host} cannot see the images: {where} does not exist there; put the "
                    "images where every node sees them at the same path")
        return None

    def write(self, shards: list[int]) -> list[int]:
        """Write the shards numbered ``shards``; the number of source items each covered."""
        self.write_shards(self.job, self.vit, self.preprocess, shards, workers=self.readers)
        return [self.job.bounds(s)[1] - self.job.bounds(s)[0] for s in shards]


def _groups(shards: list[int], n_workers: int) -> deque:
    """Consecutive shards in groups: about four per actor, at most 8 shards each (one
    pipeline per group: fewer start-ups than one shard a call, and still balanced)."""
    size = max(1, min(8, len(shards) // (4 * n_workers)))
    return deque(shards[i:i + size] for i in range(0, len(shards), size))


def index_on_ray(job, model, shards: list[int], engine, token: str, write_shards, on_shard=None,
                 stop_after: int | None = None) -> None:
    """Write the shards numbered ``shards`` of ``job`` on Ray (see the module doc).
    ``token``: the driver's lock token; ``write_shards``: the shard function (``build.write_shards``); ``on_shard(n)``: called with each finished shard's
    number of items; ``stop_after``: hand out no more groups once that many shards are written."""
    from ..engine import raise_cause, ray_session, worker_count

    if not shards:
        return
    with ray_session(engine) as ray:
        n_workers = min(worker_count(ray, engine), len(shards))
        vit = model.vit if model.vit.device.type == "cpu" else copy.deepcopy(model.vit).cpu()
        shared = ray.put((job, vit, model.preprocess, write_shards))
        actor = ray.remote(ShardWorker).options(num_cpus=engine.cpus_per_worker, num_gpus=engine.gpus_per_worker,
                                                max_restarts=0, max_task_retries=0)
        readers = max(1, int(engine.cpus_per_worker))
        actors: list = []

        def start(count: int) -> None:
            """Start ``count`` actors together and check each sees what it needs."""
            handles = [actor.remote(shared, engine.gpus_per_worker > 0, readers, os.getcwd()) for _ in range(count)]
            actors.extend(handles)
            try:
                problem = next(filter(None, ray.get([h.check.remote(token) for h in handles])), None)
            except ray.exceptions.RayActorError as err:  # its __init__ failed (e.g. no memory for the model)
                problem = f"a Ray worker could not start: {str(err).strip().splitlines()[-1]}"
            if problem:
                raise ClipInterpretError(problem)

        try:
            start(n_workers)
            todo = _groups(shards, n_workers)
            flight: dict = {}  # object ref -> (actor, group)
            written, deaths = 0, 0
            while todo or flight:
                stopping = stop_after is not None and written >= stop_after
                for handle in list(actors):
                    while todo and not stopping and sum(a is handle for a, _ in flight.values()) < IN_FLIGHT:
                        group = todo.popleft()
                        flight[handle.write.remote(group)] = (handle, group)
                if not flight:
                    break
                (ref,), _ = ray.wait(list(flight), num_returns=1)
                handle, group = flight.pop(ref)
                try:
                    sizes = ray.get(ref)
                except ray.exceptions.RayActorError:
                    finished = job.finished()
                    lost = [s for s in group if s not in finished]
                    if lost:
                        todo.appendleft(lost)
                    sizes = [job.bounds(s)[1] - job.bounds(s)[0] for s in group if s in finished]
                    if handle in actors:  # its other groups fail the same way and come back here
                        deaths += 1
                        if deaths > MAX_DEATHS * n_workers:
                            raise ClipInterpretError(
                                f"Ray workers died {deaths} times (killed, out of memory, or nodes lost); stopping. "
                                "The shards written are kept: run the same command again to resume") from None
                        actors.remove(handle)
                        ray.kill(handle)
                        start(1)
                except ray.exceptions.RayError as err:
                    raise_cause(ray, err)
                written += len(sizes)
                for size in sizes:
                    if on_shard is not None:
                        on_shard(size)
        finally:
            for handle in actors:
                ray.kill(handle)

