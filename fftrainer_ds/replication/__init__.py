"""Shadow replicas: every rank's committed snapshot streamed to k peers' host memory.

placement (ring, node-aware) -> transport (dedicated gloo group, verified chunks) -> sender
(one thread per holder) -> receiver (per-source double-buffered store) ; direct (the same wire
format, blocking, for one version at recovery) ; throttle (token bucket + AIMD) ; service (the
engine-facing object, with the call order in its module docstring) ; inventory (who holds which
version) ; holdings (the replicas of this and earlier generations that a recovery reads).
"""
from .placement import placement, replica_holders, ring_order, sources_held_by
from .receiver import ReplicaRef, SourceReplica
from .holdings import Holdings
from .inventory import Version
from .service import ReplicationService
from .throttle import AimdThrottle, TokenBucket

__all__ = ["AimdThrottle", "Holdings", "ReplicaRef", "ReplicationService", "SourceReplica", "TokenBucket", "Version",
           "placement", "replica_holders", "ring_order", "sources_held_by"]
