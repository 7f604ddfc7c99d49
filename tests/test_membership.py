"""Worker-side membership details that need no launcher: the default group formed again after a failed try."""
import subprocess
import sys
import textwrap
from datetime import timedelta

import torch
import torch.distributed as dist

from fftrainer_ds.failover.membership import _reset_group_names

PEER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from datetime import timedelta
    store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=dist.PrefixStore("gen2", store), rank=1, world_size=2,
                            timeout=timedelta(seconds=60))
    t = torch.ones(1)
    dist.all_reduce(t)
    print(int(t.item()))
""")


def test_a_timed_out_rendezvous_does_not_shift_the_next_groups_name():
    """A survivor's init_process_group that timed out (its peer died after joining) must not leave it
    naming its next default group differently from a fresh replacement (the soak's hang)."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    try:
        dist.init_process_group("gloo", store=dist.PrefixStore("gen1", store), rank=0, world_size=2,
                                timeout=timedelta(seconds=1))
        raise AssertionError("the rendezvous without a peer should have timed out")
    except Exception as exc:  # noqa: BLE001  (DistStoreError: the timeout)
        assert "timeout" in str(exc).lower() or "timed out" in str(exc).lower(), exc
    peer = subprocess.Popen([sys.executable, "-c", PEER, str(store.port)], stdout=subprocess.PIPE, text=True)
    try:
        _reset_group_names()
        dist.init_process_group("gloo", store=dist.PrefixStore("gen2", store), rank=0, world_size=2,
                                timeout=timedelta(seconds=60))
        t = torch.ones(1)
        dist.all_reduce(t)
        assert t.item() == 2
        assert peer.communicate(timeout=60)[0].strip() == "2"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        peer.kill()
