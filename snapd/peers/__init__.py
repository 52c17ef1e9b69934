"""Peer replicas: the daemons of one job on different nodes hold copies of each other's ranks'
parts, so a lost node's part comes back from its neighbours (docs/peers.md).

- ``keys``: the CurveZMQ key pair every daemon of a cluster authenticates and encrypts with.
- ``wire``: the messages daemons exchange, and a link to one peer with timeouts.
- ``directory``: who the peers are (an explicit list, or a directory every node reads).
- ``replicas``: the parts this daemon holds for its peers, in memory within a budget (or on disk).
- ``replica_keeping``: which of those it keeps (each job's newest committed step held whole).
"""
