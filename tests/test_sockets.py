"""The abandoned generation's sockets: only connected TCP sockets are recorded, and shutting them
down wakes a thread blocked on them (real loopback sockets, no mocks)."""
import socket
import sys
import threading
import time

import pytest

from fftrainer_ds.failover import sockets

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")


def _pair(listener):
    a = socket.create_connection(listener.getsockname())
    b, _ = listener.accept()
    return a, b


def test_records_connected_tcp_only_and_shutdown_wakes_a_blocked_reader():
    before = sockets.socket_fds()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    unix_a, unix_b = socket.socketpair()
    unconnected = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    a, b = _pair(listener)
    try:
        new = sockets.opened_since(before)
        assert set(new) == {a.fileno(), b.fileno()}  # never the listener, UDP, unix or unconnected ones
        assert new[a.fileno()] == sockets.socket_fds()[a.fileno()]

        got = []
        reader = threading.Thread(target=lambda: got.append(b.recv(1)), daemon=True)
        reader.start()
        time.sleep(0.1)
        assert reader.is_alive()  # blocked: nothing was sent
        t0 = time.monotonic()
        assert sockets.shutdown(new) == 2
        reader.join(timeout=5)
        assert not reader.is_alive() and got == [b""]  # woke with end-of-stream
        assert time.monotonic() - t0 < 2
        # the descriptors are still open (they belong to their owner): shutdown never closes them
        assert a.fileno() in sockets.socket_fds() and b.fileno() in sockets.socket_fds()
        # the listener still works
        c, d = _pair(listener)
        c.sendall(b"x")
        assert d.recv(1) == b"x"
        c.close()
        d.close()
    finally:
        for s in (listener, udp, unix_a, unix_b, unconnected, a, b):
            s.close()


def test_a_reused_descriptor_is_left_alone():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    before = sockets.socket_fds()
    a, b = _pair(listener)
    recorded = sockets.opened_since(before)
    fd = a.fileno()
    a.close()
    c, d = _pair(listener)  # likely takes the freed descriptor number, with a new inode
    try:
        stale = {fd: recorded[fd]}
        assert sockets.shutdown(stale) == 0
        c.sendall(b"y")
        assert d.recv(1) == b"y"  # untouched
    finally:
        for s in (listener, b, c, d):
            s.close()
