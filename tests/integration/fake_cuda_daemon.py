"""``python fake_cuda_daemon.py KERNEL_LIB STAGING_BYTES DEVICES serve ...``: snapd's daemon on the
stand-in GPUs of fake_cuda.py (its CuPy, kernel launches and driver calls replaced), for the
integration tests' ``fake_gpu`` fixture."""

import sys

import fake_cuda  # (beside this script: sys.path[0])

fake_cuda.install_daemon(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))

from snapd.cli import main  # noqa: E402 (after the stand-ins are in place)

raise SystemExit(main(sys.argv[4:]))
