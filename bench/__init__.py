"""snapd benchmarks: each compares snapd with the real peers in the same run."""
import sys
from pathlib import Path


def _prefer_installed_snapd() -> None:
    """`python -m bench` from the repository root puts the root first on sys.path, where `snapd/`
    is only part of the package: `client/` and `kernels/` become `snapd.client` and `snapd.kernels`
    at install time. Drop the root so `snapd` comes from the installed distribution (editable or
    not); `bench` itself is already imported and finds its modules through its own __path__."""
    root = Path(__file__).resolve().parent.parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]


_prefer_installed_snapd()
