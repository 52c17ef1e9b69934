"""Where the daemon's settings come from besides its flags: the TOML config file
(``/etc/snapd-ckpt/snapd.toml``, or ``--config``) and ``SNAPD_<FIELD>`` environment variables, each
value checked against the type of the setting it names before ``DaemonConfig`` checks its range."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from snapd.errors import InvalidArgument

DEFAULT = Path("/etc/snapd-ckpt/snapd.toml")


def read(path: Path, known: dict[str, str]) -> dict[str, Any]:
    """The settings of a TOML config file, each checked against the type of the field it sets
    (``known``: each field's name and type, as the dataclass spells it)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidArgument(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"config file {path}: cannot read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise InvalidArgument(f"config file {path}: not valid TOML: {e}") from None
    for key, value in data.items():
        if key not in known:
            raise InvalidArgument(f"config file {path}: unknown setting {key!r} "
                                  f"(known: {', '.join(sorted(known))})")
        t = known[key]
        ok = not isinstance(value, bool) and (
            ("tuple" in t and isinstance(value, list) and all(isinstance(x, (str, int)) for x in value)) or
            ("int" in t and isinstance(value, int)) or ("float" in t and isinstance(value, (int, float)))
            or (("str" in t or "Path" in t) and isinstance(value, str)))
        if not ok:
            raise InvalidArgument(f"config file {path}: {key} = {value!r} has the wrong type (expected {t})")
    return data


def convert(name: str, raw: str, t: str) -> Any:
    """A ``SNAPD_<NAME>`` environment value as the field's type ``t`` wants it."""
    if "tuple" in t:
        return tuple(x.strip() for x in raw.split(",") if x.strip())
    try:
        if "int" in t:
            return int(raw)
        if "float" in t:
            return float(raw)
    except ValueError:
        raise InvalidArgument(f"SNAPD_{name.upper()}={raw!r} is not a number") from None
    return raw
