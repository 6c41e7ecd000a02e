#!/usr/bin/env python3
"""A stand-in rpcbind for running nfs-ganesha in tests, on the local unix socket only.

ganesha.nfsd refuses to start without a portmapper: it registers its programs through libtirpc,
which talks to rpcbind over the unix socket /run/rpcbind.sock. Debian's rpcbind cannot be kept
off the network (it crashes when bound to 127.0.0.1 only), so this stub answers every SET and
UNSET with TRUE, any other procedure with 0, and opens no TCP or UDP port. Clients that need a
port (the store's NFS client) are given it directly (nfs://HOST:PORT/EXPORT?mountport=N).

    fake_rpcbind.py [SOCKET]      # default /run/rpcbind.sock

While SOCKET already answers (another test run's stub), this one waits and takes over when that
one is gone, so concurrent test runs share one portmapper and none is left without.
"""
import os
import signal
import socket
import struct
import sys
import threading
import time

PATH = sys.argv[1] if len(sys.argv) > 1 else "/run/rpcbind.sock"
LAST_FRAGMENT = 0x80000000


def read_exact(conn, n):
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def read_record(conn):
    """One RPC record: fragments up to the one with the last-fragment bit."""
    msg = b""
    while True:
        head = read_exact(conn, 4)
        if head is None:
            return None
        (mark,) = struct.unpack(">I", head)
        frag = read_exact(conn, mark & ~LAST_FRAGMENT)
        if frag is None:
            return None
        msg += frag
        if mark & LAST_FRAGMENT:
            return msg


def serve(conn):
    with conn:
        while True:
            msg = read_record(conn)
            if msg is None or len(msg) < 24:
                return
            xid, _msgtype, _rpcvers, _prog, _vers, proc = struct.unpack(">6I", msg[:24])
            body = b"" if proc == 0 else struct.pack(">I", 1 if proc in (1, 2) else 0)
            # REPLY, MSG_ACCEPTED, verifier AUTH_NULL with empty body, SUCCESS.
            reply = struct.pack(">6I", xid, 1, 0, 0, 0, 0) + body
            conn.sendall(struct.pack(">I", LAST_FRAGMENT | len(reply)) + reply)


def answers(path):
    """Whether another stub (or a real rpcbind) serves `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # Another test run's stub may serve the socket: leave it be, and take over when it is gone.
    said = False
    while answers(PATH):
        if not said:
            print(f"fake_rpcbind: {PATH} is already served; waiting", flush=True)
            said = True
        time.sleep(0.2)
    if os.path.lexists(PATH):
        os.unlink(PATH)  # stale
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(PATH)
    os.chmod(PATH, 0o666)
    inode = os.stat(PATH).st_ino
    server.listen(16)
    print(f"fake_rpcbind: listening on {PATH}", flush=True)
    try:
        while True:
            conn, _ = server.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()
    finally:
        # Only our own socket file: another stub may have replaced a stale one.
        try:
            if os.stat(PATH).st_ino == inode:
                os.unlink(PATH)
        except OSError:
            pass


if __name__ == "__main__":
    main()
