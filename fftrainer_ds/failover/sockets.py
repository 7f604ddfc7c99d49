"""The TCP sockets a process-group generation opened, so they can be shut down when it is abandoned.

torch keeps C++ references to a destroyed gloo group, so its sockets stay open until the process
exits, and a live peer still blocked in an old collective would wait for its timeout. Shutting
down the generation's own sockets wakes such peers at once ("Connection closed by peer").
Sockets are recorded as (fd, inode) and shut down only while the fd still holds that inode.

Only this process's own descriptors are inspected (a few syscalls each): an earlier version read
the machine-wide /proc/net/tcp, which with 16 fully meshed ranks and a few abandoned generations
cost ~0.1-0.2 s of CPU per rank and per call, on the recovery's critical path.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Dict

logger = logging.getLogger("fftrainer_ds")

_FD_DIR = "/proc/self/fd"


def _inode(fd: int) -> int:
    """The socket inode behind `fd`, or -1 when `fd` is closed or not a socket."""
    try:
        link = os.readlink(f"{_FD_DIR}/{fd}")
    except OSError:
        return -1
    return int(link[8:-1]) if link.startswith("socket:[") else -1


def socket_fds() -> Dict[int, int]:
    """fd -> inode of every socket this process holds (empty without /proc)."""
    try:
        names = os.listdir(_FD_DIR)
    except OSError:
        return {}
    out = {}
    for name in names:
        ino = _inode(int(name))
        if ino >= 0:
            out[int(name)] = ino
    return out


def _connected_tcp(fd: int) -> bool:
    """A connected TCP socket. Listening sockets never qualify: gloo's listener thread aborts the
    process when its accept() fails, so a listener must never be shut down."""
    try:
        s = socket.socket(fileno=fd)  # family and type are read from the descriptor
    except OSError:
        return False
    try:
        if s.family not in (socket.AF_INET, socket.AF_INET6) or s.type != socket.SOCK_STREAM:
            return False
        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return False
        s.getpeername()  # ENOTCONN for a socket that is not connected
        return True
    except OSError:
        return False
    finally:
        s.detach()  # the fd belongs to its owner (gloo, the store client): never close it here


def opened_since(before: Dict[int, int]) -> Dict[int, int]:
    """Connected TCP sockets open now that were not open (as the same inode) in `before`."""
    return {fd: ino for fd, ino in socket_fds().items() if before.get(fd) != ino and _connected_tcp(fd)}


def shutdown(sockets: Dict[int, int]) -> int:
    """shutdown(2) each recorded socket still open as the same inode; returns how many.

    A recorded socket was connected when recorded, and a connected socket never becomes a listener,
    so the inode check alone keeps listeners (and reused descriptors) out.
    """
    n = 0
    for fd, ino in sockets.items():
        if _inode(fd) != ino:
            continue
        try:
            s = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            s.shutdown(socket.SHUT_RDWR)
            n += 1
        except OSError:
            pass
        finally:
            s.detach()
    return n
