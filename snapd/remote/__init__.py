"""The remote tier: snapshots in an S3 bucket behind the local ones (docs/remote.md).

- ``store``: the bucket and prefix, and every call made to it (boto3);
- ``remote_job``: a job's snapshots there: upload (the manifest object last), list, delete;
- ``reader``: reading a remote snapshot chunk by chunk with ranged GETs;
- ``tiers``: both tiers as one (latest wins wherever it is), for ``load`` and ``snapd ls``;
- ``bandwidth``: the uploads' bandwidth bound.
Nothing here imports the daemon.
"""
