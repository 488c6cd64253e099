"""The serving settings, read once from the runtime config into typed values.

They cover what caikit 0.29 leaves open: where the listeners bind, who may call them
(API keys, TLS), which Host names the HTTP server answers, how large and how slow a
request may be, and how long shutdown may take.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import caikit

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _positive(value: Any, field: str, integer: bool = False) -> float:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        raise ValueError(
            f"`{field}` must be a positive {'integer' if integer else 'number'}, got {value!r}."
        )
    return value


@dataclass(frozen=True)
class HttpLimits:
    """Bounds on one HTTP request (config runtime.http.limits)."""

    max_body_bytes: int = 4 * 2**20  # 413 beyond; gRPC's own message limit is 4 MiB too
    max_header_bytes: int = 64 * 2**10  # request line + headers; 431 beyond
    max_headers: int = 100  # 431 beyond
    header_timeout_seconds: float = 10.0  # 408 when the headers take longer
    body_timeout_seconds: float = 30.0  # 408 when the body takes longer

    @classmethod
    def from_config(cls, values: Any) -> HttpLimits:
        values = dict(values or {})
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"unknown runtime.http.limits key(s) {unknown}; valid: {sorted(cls.__dataclass_fields__)}."
            )
        limits = cls(**{k: v for k, v in values.items() if v is not None})
        for name, field in cls.__dataclass_fields__.items():
            _positive(getattr(limits, name), f"runtime.http.limits.{name}", field.type == "int")
        return limits


@dataclass(frozen=True)
class ServingSettings:
    host: str
    limits: HttpLimits
    # Host header values the HTTP server answers; empty: any (a wildcard bind).
    allowed_hosts: tuple[str, ...]
    api_keys: tuple[str, ...]
    tls: bool
    shutdown_timeout_seconds: float

    @property
    def authenticated(self) -> bool:
        return bool(self.api_keys)

    @classmethod
    def from_config(cls, config: Any, host: str | None = None) -> ServingSettings:
        runtime = config.runtime
        host = host or runtime.get("bind_host") or "127.0.0.1"
        auth = dict(runtime.get("auth") or {})
        http = dict(runtime.get("http") or {})
        tls = dict(dict(runtime.get("tls") or {}).get("server") or {})
        settings = cls(
            host=host,
            limits=HttpLimits.from_config(http.get("limits")),
            allowed_hosts=_allowed_hosts(host, http.get("allowed_hosts")),
            api_keys=_api_keys(auth.get("api_keys"), auth.get("api_keys_file")),
            tls=bool(tls.get("key") and tls.get("cert")),
            shutdown_timeout_seconds=_positive(
                runtime.get("shutdown_timeout_seconds", 5), "runtime.shutdown_timeout_seconds"
            ),
        )
        protected = settings.tls or settings.authenticated
        if not (is_loopback(host) or protected or runtime.get("allow_unprotected_bind", False)):
            raise ValueError(
                f"refusing to listen on {host!r} without TLS or API keys: anyone who can "
                "reach it could train and read every model. Set runtime.tls.server.key/cert "
                "or runtime.auth.api_keys(_file), or set runtime.allow_unprotected_bind: "
                "true to accept the risk."
            )
        return settings


def _allowed_hosts(host: str, extra: Any) -> tuple[str, ...]:
    """Loopback names, the bind address and the configured names; any name when the
    server listens on every interface and no names are configured."""
    if isinstance(extra, str):
        extra = [name.strip() for name in extra.split(",") if name.strip()]
    extra = [str(name).lower() for name in (extra or [])]
    if "*" in extra or (host in WILDCARD_HOSTS and not extra):
        return ()
    names = [*LOOPBACK_NAMES, *extra]
    if host not in WILDCARD_HOSTS:
        names.append(host.lower())
    return tuple(dict.fromkeys(names))


def _api_keys(keys: Any, keys_file: Any) -> tuple[str, ...]:
    if isinstance(keys, str):
        keys = keys.split(",")
    found = [str(key).strip() for key in (keys or [])]
    if keys_file:
        path = Path(str(keys_file)).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise ValueError(f"runtime.auth.api_keys_file cannot be read: {err.strerror}.") from err
        found += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    keys = tuple(key for key in found if key)
    short = [key for key in keys if len(key) < 16]
    if short:
        raise ValueError("API keys must be at least 16 characters long (runtime.auth).")
    return keys


@dataclass(frozen=True)
class RuntimeFolders:
    """The runtime's folders and config files, as configured (paths as given)."""

    local_models_dir: str | None
    training_output_dir: str | None
    file_source_base: str | None
    # The runtime config file(s) training workers must read too.
    config_files: str | None

    @classmethod
    def from_config(cls, config: Any) -> RuntimeFolders:
        runtime = config.runtime
        return cls(
            local_models_dir=runtime.get("local_models_dir") or None,
            training_output_dir=dict(runtime.get("training") or {}).get("output_dir") or None,
            file_source_base=dict(config.get("data_streams") or {}).get("file_source_base"),
            config_files=os.environ.get("CONFIG_FILES") or config.get("config_files") or None,
        )


_FOLDERS: tuple[Any, RuntimeFolders] | None = None


def runtime_folders() -> RuntimeFolders:
    """The folders of the current caikit configuration (read once per configuration)."""
    global _FOLDERS
    config = caikit.get_config()
    if _FOLDERS is None or _FOLDERS[0] is not config:
        _FOLDERS = (config, RuntimeFolders.from_config(config))
    return _FOLDERS[1]
