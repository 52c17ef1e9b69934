"""Prometheus metrics (``snapd serve --metrics-addr 127.0.0.1:PORT``), base units, ``snapd_`` prefix.

A private registry, not prometheus_client's global one. The server thread
updates the metrics; prometheus_client's own thread serves them over HTTP.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from snapd import __version__
from snapd.errors import InvalidArgument

log = logging.getLogger(__name__)

# up to 30 minutes: a multi-TB snapshot on a slow filesystem takes that long
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600,
                    1200, 1800)


def parse_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        port_n = int(port)
    except ValueError:
        raise InvalidArgument(f"metrics_addr {addr!r} must be IP:PORT, e.g. 127.0.0.1:9464") from None
    if not sep or not 0 <= port_n <= 65535:
        raise InvalidArgument(f"metrics_addr {addr!r}: port must be 0..65535")
    return host, port_n


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.snapshots = Counter("snapd_snapshots", "Snapshots by result", ["result"], registry=r)
        self.raw_bytes = Counter("snapd_snapshot_raw_bytes", "Tensor bytes handed to the daemon", registry=r)
        self.stored_bytes = Counter("snapd_snapshot_stored_bytes", "Bytes written to disk", registry=r)
        self.stall = Histogram("snapd_stall_seconds", "From a client's buffer request to the daemon holding "
                               "its bytes (the trainer's wait plus its copy)", buckets=DURATION_BUCKETS,
                               registry=r)
        self.persist = Histogram("snapd_persist_seconds", "From receiving a snapshot to its commit on disk",
                                 buckets=DURATION_BUCKETS, registry=r)
        self.buffer_bytes = Gauge("snapd_buffer_bytes", "Host buffer bytes by state", ["state"], registry=r)
        self.clients = Gauge("snapd_clients", "Connected clients", registry=r)
        self.last_success = Gauge("snapd_last_success_timestamp_seconds", "Unix time of the last persisted "
                                  "snapshot", registry=r)
        Info("snapd_build", "snapd build information", registry=r).info({"version": __version__})
        for result in ("persisted", "failed", "skipped"):
            self.snapshots.labels(result)  # export zeros from the start
        self.url = ""

    def serve(self, addr: str) -> str:
        host, port = parse_addr(addr)
        if not ipaddress.ip_address(host).is_loopback:
            log.warning("metrics served on %s, beyond this node's loopback", host)
        server, _thread = start_http_server(port, host, registry=self.registry)
        self.url = f"http://{addr.rpartition(':')[0]}:{server.server_port}/metrics"
        log.info("metrics at %s", self.url)
        return self.url

    def remote(self, status: Callable[[], dict]) -> None:
        """The remote tier's figures, read from the upload thread's counters at each scrape."""
        self.registry.register(_RemoteCollector(status))

    def peers(self, status: Callable[[], dict]) -> None:
        """Replication's figures (snapd.daemon.peers), read at each scrape."""
        self.registry.register(_PeerCollector(status))

    def persisted(self, raw: int, stored: int, seconds: float) -> None:
        self.snapshots.labels("persisted").inc()
        self.raw_bytes.inc(raw)
        self.stored_bytes.inc(stored)
        self.persist.observe(seconds)
        self.last_success.set(time.time())

    def buffers(self, busy_bytes: int, free_bytes: int) -> None:
        self.buffer_bytes.labels("busy").set(busy_bytes)
        self.buffer_bytes.labels("free").set(free_bytes)


class _RemoteCollector:
    def __init__(self, status: Callable[[], dict]) -> None:
        self.status = status

    def describe(self) -> list:
        return []  # (collected at scrape time only)

    def collect(self) -> Iterator:
        st = self.status()
        for name, key, doc in (("snapd_remote_uploads", "uploaded", "Snapshots committed to the remote tier"),
                               ("snapd_remote_uploaded_bytes", "uploaded_bytes", "Bytes uploaded"),
                               ("snapd_remote_upload_seconds", "seconds", "Seconds spent uploading"),
                               ("snapd_remote_upload_failures", "failures", "Failed upload attempts"),
                               ("snapd_remote_skipped", "skipped", "Snapshots skipped by a full backlog")):
            yield CounterMetricFamily(name, doc, value=st[key])
        yield GaugeMetricFamily("snapd_remote_backlog_snapshots", "Snapshots waiting for upload",
                                value=st["backlog"])
        yield GaugeMetricFamily("snapd_remote_backlog_bytes", "Bytes waiting for upload",
                                value=st["backlog_bytes"])
        yield GaugeMetricFamily("snapd_remote_backlog_oldest_seconds", "Age of the oldest upload waiting",
                                value=st["oldest_s"])


class _PeerCollector:
    def __init__(self, status: Callable[[], dict]) -> None:
        self.status = status

    def describe(self) -> list:
        return []  # (collected at scrape time only)

    def collect(self) -> Iterator:
        st = self.status()
        by_peer = [("snapd_peer_replicated_bytes", "replicated_bytes", "Bytes of parts sent to a peer", True),
                   ("snapd_peer_replication_failures", "failures", "Failed sends to a peer", True),
                   ("snapd_peer_resent_parts", "resent_parts", "Parts sent again: the peer lost them", True),
                   ("snapd_peer_backlog_parts", "backlog_parts", "Parts waiting to be sent to a peer", False),
                   ("snapd_peer_backlog_bytes", "backlog_bytes", "Bytes waiting to be sent to a peer", False),
                   ("snapd_peer_lag_seconds", "oldest_s", "Age of the oldest part waiting for a peer", False)]
        for name, key, doc, counter in by_peer:
            family = (CounterMetricFamily if counter else GaugeMetricFamily)(name, doc, labels=["peer"])
            for p in st["peers"]:
                family.add_metric([p["endpoint"]], p[key])
            yield family
        yield GaugeMetricFamily("snapd_peer_held_bytes", "Bytes of the peers' parts held in memory",
                                value=st["held"]["memory_bytes"])
        yield CounterMetricFamily("snapd_peer_refused", "Peers refused (key or handshake)",
                                  value=st["refused"])
        yield CounterMetricFamily("snapd_peer_fetched_bytes", "Bytes of parts brought from peers",
                                  value=st["fetched_bytes"])
        yield CounterMetricFamily("snapd_peer_damaged_copies", "Peers' copies that failed their checksums",
                                  value=st["damaged_copies"])
        yield CounterMetricFamily("snapd_peer_prefetched_parts", "Parts brought here at their rank's hello",
                                  value=st["prefetched_parts"])
