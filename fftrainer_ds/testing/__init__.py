"""Test helpers shipped with the package: spawn real ranks on loopback, inject faults."""
from .dist import RankResult, run_ranks, worker_init_process_group

__all__ = ["RankResult", "run_ranks", "worker_init_process_group"]
