"""snapd benchmarks: each compares snapd with the real peers in the same run."""
