"""Which event loop runs the sidecar: the stdlib's, or uvloop when it is installed.

uvloop is an optional extra (``pip install pg-tls-sidecar[uvloop]``), never a runtime
dependency: the relay is correct on the stdlib loop, and uvloop only makes it cheaper (in the
relay experiments of issue 7 it cut the CPU per transaction roughly in half). So ``auto``, the
default, takes uvloop when it can be imported and otherwise runs on the stdlib loop; only an
explicit ``uvloop`` that cannot be had is an error, because whoever wrote it expects the speed.
A plain install (and the container image) has no uvloop, so the stdlib loop is what runs there.

Asking the import system (rather than reading package metadata) is what decides: a uvloop
that is "installed" but cannot load on this platform is as good as absent.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable
from typing import Final, cast

from proxy.errors import ConfigError
from proxy.settings import EventLoopSetting

EVENT_LOOP_SETTINGS: Final[tuple[EventLoopSetting, ...]] = ("auto", "asyncio", "uvloop")
EVENT_LOOP_ENV: Final = "PG_TLS_SIDECAR_EVENT_LOOP"  # like --event-loop, below file and flag
UVLOOP_INSTALL: Final = "pip install 'pg-tls-sidecar[uvloop]'"

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def _uvloop_factory() -> tuple[LoopFactory, str] | None:
    """uvloop's loop constructor and version, or None when it cannot be imported."""
    try:
        module = importlib.import_module("uvloop")
    except ImportError:
        return None
    return cast(LoopFactory, module.new_event_loop), str(getattr(module, "__version__", "?"))


def choose_loop(setting: str, *, key: str = "event_loop") -> tuple[str, LoopFactory | None]:
    """``(name, loop_factory)`` for ``asyncio.Runner``; a factory of None means the stdlib loop.

    ``name`` is what the start-up log line shows: ``asyncio`` or ``uvloop <version>``. ``key``
    names the setting as the user wrote it (``--event-loop``, ``PG_TLS_SIDECAR_EVENT_LOOP``),
    for the error message.
    """
    if setting not in EVENT_LOOP_SETTINGS:
        raise ConfigError(
            key,
            "is not an event loop choice",
            value=setting,
            fix=f"use one of {', '.join(EVENT_LOOP_SETTINGS)}",
        )
    if setting == "asyncio":
        return "asyncio", None
    found = _uvloop_factory()
    if found is not None:
        factory, version = found
        return f"uvloop {version}", factory
    if setting == "auto":
        return "asyncio", None
    raise ConfigError(
        key,
        "asks for uvloop, which is not installed in this Python environment",
        value=setting,
        fix=f"install it with {UVLOOP_INSTALL}, or use auto (uvloop when installed) or asyncio",
    )
