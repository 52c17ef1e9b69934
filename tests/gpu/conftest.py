"""The GPU tests start real daemons like the integration tests do: reuse their fixture."""

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("snapd_tests_integration_conftest",
                                               Path(__file__).parent.parent / "integration" / "conftest.py")
_integration = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _integration  # its dataclass looks its module up there
_spec.loader.exec_module(_integration)

start = _integration.start
