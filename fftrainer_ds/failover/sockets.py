"""The TCP sockets a process-group generation opened, so they can be shut down when it is abandoned.

torch keeps C++ references to a destroyed gloo group, so its sockets stay open until the process
exits, and a live peer still blocked in an old collective would wait for its timeout. Shutting
down the generation's own sockets wakes such peers at once ("Connection closed by peer").
Sockets are recorded as (fd, inode) and shut down only while the fd still holds that inode.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Dict

logger = logging.getLogger("fftrainer_ds")


_ESTABLISHED = "01"  # /proc/net/tcp "st"; a listening socket (0A) must never be shut down: gloo's
#                      listener thread aborts the process when its accept() fails


def _tcp_inodes() -> set:
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[3] == _ESTABLISHED:
                        out.add(int(cols[9]))
        except OSError:
            continue
    return out


def tcp_sockets() -> Dict[int, int]:
    """fd -> inode of every established TCP connection of this process (empty without /proc)."""
    tcp = _tcp_inodes()
    out = {}
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return out
    for name in fds:
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inode = int(link[8:-1])
            if inode in tcp:
                out[int(name)] = inode
    return out


def opened_since(before: Dict[int, int]) -> Dict[int, int]:
    """TCP sockets open now that were not open (as the same inode) in `before`."""
    return {fd: ino for fd, ino in tcp_sockets().items() if before.get(fd) != ino}


def shutdown(sockets: Dict[int, int]) -> int:
    """shutdown(2) each recorded socket still open as the same inode; returns how many."""
    current = tcp_sockets()
    n = 0
    for fd, ino in sockets.items():
        if current.get(fd) != ino:
            continue
        try:
            s = socket.socket(fileno=fd)
            try:
                s.shutdown(socket.SHUT_RDWR)
                n += 1
            finally:
                s.detach()  # the fd still belongs to gloo: never close it here
        except OSError:
            pass
    return n
