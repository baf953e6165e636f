"""A worker as a group of Ray actors, one a rank. Rank 0 runs the engine core that drives the schedule and
starts the worker's frontend process, which serves its internal HTTP API (worker/host.py); ranks 1.. run
the same forward passes (engine.model_runner.follow) and send their share of a request's KV when rank 0
asks. A rank that dies takes the whole worker to unhealthy (its requests fail, /health answers 503 naming
the rank); WorkerGroup.restart brings a fresh group up on the same port.

A single-rank worker is a group of one. On GPU machines each rank of a parallel worker holds one GPU,
all of them on one node (a placement group); elsewhere ranks are CPU actors talking gloo.
"""

import logging
import socket
import threading

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from worker.config import WorkerConfig

log = logging.getLogger("pdserve.worker")


class RankFailedError(RuntimeError):
    """A rank of a tensor/expert-parallel worker died: the worker cannot compute until it is restarted."""


@ray.remote(num_cpus=0, max_restarts=0)
class RankActor:
    def __init__(self, config: WorkerConfig, rank: int):
        logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
        self.config, self.rank = config, rank
        self.shard = self.host = None
        self.stopping = False

    def rendezvous(self) -> str:
        """tcp://address:port where the group's ranks meet (asked of rank 0)."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def setup(self, init_method: str | None) -> object:
        """Join the group, load this rank's shard of the model; returns its KV pool's descriptor."""
        from engine.llm_engine import resolve_device
        from engine.parallel import SINGLE, ParallelConfig, init_parallel

        cfg = self.config
        parallel = SINGLE
        if init_method is not None:
            parallel = init_parallel(ParallelConfig(cfg.tp_size, cfg.ep_size), self.rank, init_method,
                                     resolve_device(cfg.engine.device), cfg.collective_timeout_s)
        if self.rank == 0:
            from worker.host import WorkerHost

            self.host = WorkerHost(cfg, parallel)
            return self.host.shard.descriptor
        from worker.shard import EngineShard

        self.shard = EngineShard(cfg, parallel)
        return self.shard.descriptor

    # --- ranks 1.. ---

    def follow(self) -> None:
        """Runs until rank 0 stops the group (or dies)."""
        self.shard.engine.runner.follow()

    def send_kv(self, targets: list, src_block_ids: list[int], dst_block_ids: list[int], timeout_s: float) -> int:
        return self.shard.send(targets, src_block_ids, dst_block_ids, timeout_s)

    # --- rank 0 ---

    def serve(self, descriptors: list, followers: list) -> str:
        """Start the engine core and the frontend; watch the other ranks. Returns the worker's URL once it
        answers."""
        if followers:
            self.host.core.attach_ranks(descriptors, [self._sender(f) for f in followers])
            refs = [f.follow.remote() for f in followers]
            threading.Thread(target=self._watch, args=(refs,), daemon=True).start()
        return self.host.start()

    @staticmethod
    def _sender(actor):
        def start(targets: list, src: list[int], dst: list[int], timeout_s: float):
            ref = actor.send_kv.remote(targets, src, dst, timeout_s)
            return lambda: ray.get(ref)

        return start

    def _watch(self, refs: list) -> None:
        ready, _ = ray.wait(refs, num_returns=1)
        if self.stopping:
            return
        rank = refs.index(ready[0]) + 1
        try:
            ray.get(ready[0])
            reason = "left the group"
        except Exception as e:  # RayActorError: the actor process is gone
            reason = f"died ({type(e).__name__})"
        log.error("worker %s: rank %d %s; the worker is unhealthy until restarted", self.config.name, rank, reason)
        self.host.core.fail(RankFailedError(f"rank {rank} of worker {self.config.name} {reason}"))

    def stop(self) -> None:
        self.stopping = True
        if self.host is not None:
            self.host.stop()


class WorkerGroup:
    """The driver's handle on one worker's rank actors (started at construction)."""

    def __init__(self, config: WorkerConfig, gpus_per_rank: float = 0.0, timeout_s: float = 600.0):
        self.config = config
        self.gpus_per_rank, self.timeout_s = gpus_per_rank, timeout_s
        self.actors: list = []
        self.placement = None
        self.url = self._start()

    def _start(self) -> str:
        cfg, world = self.config, self.config.world_size
        strategy = None
        if self.gpus_per_rank and world > 1:  # one GPU a rank, all on one node
            have = ray.cluster_resources().get("GPU", 0)
            if have < world:
                raise RuntimeError(f"worker {cfg.name} needs {world} GPUs (tp_size x ep_size), "
                                   f"the Ray cluster has {have:g}")
            self.placement = placement_group([{"GPU": 1}] * world, strategy="STRICT_PACK")
            ray.get(self.placement.ready(), timeout=self.timeout_s)
        for rank in range(world):
            if self.placement is not None:
                strategy = PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=rank)
            name = cfg.name if world == 1 else f"{cfg.name}.rank{rank}"
            self.actors.append(RankActor.options(
                name=name, num_gpus=1 if self.placement is not None else self.gpus_per_rank, max_concurrency=4,
                scheduling_strategy=strategy).remote(cfg, rank))
        try:
            init = ray.get(self.actors[0].rendezvous.remote()) if world > 1 else None
            descriptors = ray.get([a.setup.remote(init) for a in self.actors], timeout=self.timeout_s)
            return ray.get(self.actors[0].serve.remote(descriptors[1:], self.actors[1:]), timeout=self.timeout_s)
        except BaseException:  # a rank failed to start (bad model, sizes that do not split): leave nothing behind
            self.stop()
            raise

    def stop(self) -> None:
        """Stop rank 0's server (which stops the other ranks), then every actor; safe to call twice."""
        if self.actors:
            try:
                ray.get(self.actors[0].stop.remote(), timeout=self.config.drain_timeout_s + 20)  # drain, then stop
            except Exception as e:  # a dead rank 0 is already stopped
                log.debug("stopping rank 0 of %s: %r", self.config.name, e)
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self.placement is not None:
            remove_placement_group(self.placement)
            self.placement = None

    def restart(self) -> str:
        self.stop()
        self.url = self._start()
        return self.url
