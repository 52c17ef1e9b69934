"""What CurveZMQ costs a peer link: ``python -m bench.curve_link``.

The bytes of ``--mib`` MiB pulled in 4 MiB replies (snapd.peers.wire's pieces, 4 requests in
flight a link) from a ROUTER to DEALERs over loopback TCP, in one process, with and without CURVE,
over 1 and ``wire.STREAMS`` links: the floor under a peer restore (bench/recovery.py) and how much
of it is the encryption. Prints one line per case (median of ``--reps``).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import zmq

from snapd.peers import wire


def pull(mib: int, links: int, curve: bool) -> float:
    """Seconds to pull ``mib`` MiB over ``links`` links at once."""
    ctx = zmq.Context(io_threads=links)
    public, secret = zmq.curve_keypair()
    server = ctx.socket(zmq.ROUTER)
    if curve:
        server.curve_server, server.curve_secretkey, server.curve_publickey = True, secret, public
    port = server.bind_to_random_port("tcp://127.0.0.1")
    piece = bytes(wire.PIECE_BYTES)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if server.poll(100):
                ident, _ = server.recv_multipart()
                server.send_multipart([ident, piece], copy=False)

    def client(count: int) -> None:
        sock = ctx.socket(zmq.DEALER)
        if curve:
            sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
            sock.curve_serverkey = public
        sock.connect(f"tcp://127.0.0.1:{port}")
        sent = got = 0
        while got < count:
            while sent < count and sent - got < 4:
                sock.send(b"get")
                sent += 1
            sock.recv(copy=False)
            got += 1
        sock.close(0)

    threading.Thread(target=serve, daemon=True).start()
    per = max(1, (mib << 20) // wire.PIECE_BYTES // links)
    clients = [threading.Thread(target=client, args=(per,)) for _ in range(links)]
    t0 = time.perf_counter()
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    took = time.perf_counter() - t0
    stop.set()
    time.sleep(0.2)  # (the server thread sees stop)
    server.close(0)
    ctx.term()
    return took


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.curve_link", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    for curve in (False, True):
        for links in (1, wire.STREAMS):
            took = statistics.median(pull(args.mib, links, curve) for _ in range(args.reps))
            print(f"{'CURVE' if curve else 'plain'} {links} link(s): {took:.3f} s, "
                  f"{args.mib / took:.0f} MiB/s", flush=True)


if __name__ == "__main__":
    main()
