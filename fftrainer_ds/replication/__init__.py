"""Shadow replicas: every rank's committed snapshot streamed to k peers' host memory.

placement (ring, node-aware) -> transport (dedicated gloo group, verified chunks, sender threads)
-> receiver (per-source double-buffered store) ; throttle (token bucket + AIMD) ; service (the
engine-facing object, with the call order in its module docstring).
"""
from .placement import placement, replica_holders, ring_order, sources_held_by
from .receiver import ReplicaRef, SourceReplica
from .inventory import inventory_key, read_inventory
from .service import ReplicationService
from .throttle import AimdThrottle, TokenBucket

__all__ = ["AimdThrottle", "ReplicaRef", "ReplicationService", "SourceReplica", "TokenBucket", "inventory_key",
           "placement", "read_inventory", "replica_holders", "ring_order", "sources_held_by"]
