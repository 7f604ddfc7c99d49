"""An authenticated all-gather of small JSON documents: what ranks tell each other during a recovery
(failover/recovery.py `RankInfo`) and about their replicas (inventory.py), without pickle.

`torch.distributed.all_gather_object` unpickles what every peer sent: whoever can put bytes into the
group runs code in every rank. Here each rank sends UTF-8 JSON (an all-gather of the lengths, then
one of the padded bytes) behind an HMAC-SHA256 tag over (its group rank, the group size, the
document), keyed with a key of the job secret (secret.py) that the caller picks per purpose and
generation. A receiver checks every tag and parses strictly (standard JSON only); the caller turns
the documents into its typed records and refuses any other shape. Every failure is a
RecoverableError (the recovery moves to the next generation).
"""
from __future__ import annotations

import hmac
import json
import struct
from typing import Any, List

import torch
import torch.distributed as dist

from ..errors import RecoverableError
from ..secret import MAC_BYTES, mac

MAX_DOCUMENT_BYTES = 64 << 20  # a length beyond this is refused before anything is allocated


def _bound(rank: int, world_size: int) -> bytes:
    return struct.pack("<qq", rank, world_size)  # a document replayed as another rank's does not verify


def all_gather_json(doc: Any, key: bytes, what: str, group=None) -> List[Any]:
    """Every rank's `doc`, in group rank order. COLLECTIVE over `group` (None: the default group)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    body = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")
    msg = mac(key, _bound(rank, world), body) + body
    try:
        lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(lengths, torch.tensor([len(msg)], dtype=torch.int64), group=group)
        sizes = [int(t.item()) for t in lengths]
        if any(not MAC_BYTES <= n <= MAX_DOCUMENT_BYTES for n in sizes):
            raise RecoverableError(f"{what}: a peer announced a message of {max(sizes)} bytes (refused)")
        width = max(sizes)
        out = [torch.zeros(width, dtype=torch.uint8) for _ in range(world)]
        mine = torch.zeros(width, dtype=torch.uint8)
        mine[:len(msg)] = torch.frombuffer(bytearray(msg), dtype=torch.uint8)
        dist.all_gather(out, mine, group=group)
    except RecoverableError:
        raise
    except Exception as exc:  # gloo raises RuntimeError / DistBackendError when a peer is gone
        raise RecoverableError(f"{what}: all-gather failed ({exc})") from exc
    return [_open(bytes(out[r][:sizes[r]].numpy()), key, r, world, what) for r in range(world)]


def _refuse_constant(token: str) -> Any:
    raise ValueError(f"non-standard JSON constant {token}")


def _open(msg: bytes, key: bytes, rank: int, world: int, what: str) -> Any:
    tag, body = msg[:MAC_BYTES], msg[MAC_BYTES:]
    if not hmac.compare_digest(tag, mac(key, _bound(rank, world), body)):
        raise RecoverableError(f"{what}: the message of rank {rank} failed authentication (not from a rank of "
                               f"this job and generation); refused")
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise RecoverableError(f"{what}: malformed message from rank {rank} ({exc})") from None


def int_list(x: Any, what: str) -> List[int]:
    """`x` if it is a list of ints (not bools), else ValueError naming `what`."""
    if type(x) is not list or any(type(v) is not int for v in x):
        raise ValueError(f"{what} must be a list of integers, got {x!r:.80}")
    return x
