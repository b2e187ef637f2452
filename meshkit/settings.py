"""Settings: one frozen object per service, built in main() and passed down.

Sources, strongest first: environment variables (``NLPMESH_<SERVICE>_<FIELD>``),
the TOML file named by ``NLPMESH_CONFIG`` (table ``[<service>]``), then defaults.
Nothing is read at import time.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import AliasChoices, Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_ENV = "NLPMESH_CONFIG"
# Where every service writes its spans as JSON lines (ServiceSettings.trace_dir).
TRACE_DIR_ENV = "NLPMESH_TRACE_DIR"
# One folder of certificates for the whole mesh (ServiceSettings.tls_dir, meshkit/tls.py).
TLS_DIR_ENV = "NLPMESH_TLS_DIR"

# The mesh's well-known ports (docs/api.md): the gateway on 50051, the rest after it; the OpenAI-compatible
# HTTP edge (services/openai_edge), then the embedding replicas (services/embedding).
DEFAULT_PORTS = {"gateway": 50051, "template": 50052, "tokenizer": 50053, "cache": 50054, "inference": 50055,
                 "edge": 50056, "embedding": 50057}


def default_home() -> Path:
    """Where nlpmesh keeps converted models, run state and local traces."""
    return Path(os.environ.get("NLPMESH_HOME", Path.home() / ".cache" / "nlpmesh"))


class ServiceSettings(BaseSettings):
    """What every service has: where it listens and how it shuts down."""

    service: ClassVar[str] = ""

    host: str = "127.0.0.1"
    port: int = 0
    grace_s: float = 5.0
    reflection: bool = True
    log_level: str = "INFO"
    # "text" for people, "json" (one object per line) for log shippers; both carry request and trace ids.
    log_format: Literal["text", "json"] = "text"
    max_message_bytes: int = 4 * 1024 * 1024
    # A client's connection is closed (GOAWAY) after this long, and its calls given the grace to
    # finish: a client re-resolves a dns:/// name when it reconnects, so replicas added since
    # (compose --scale, a Kubernetes autoscaler) get their share. 0 = never. The grace outlasts a
    # generation's whole budget.
    max_connection_age_s: float = Field(default=300.0, ge=0)
    max_connection_age_grace_s: float = Field(default=120.0, ge=0)
    # Prometheus /metrics on this port; 0 = no endpoint.
    metrics_port: int = 0
    # Test-only: a delay added to every call this service serves (meshkit/faults.py).
    fault_delay_ms: float = 0.0
    # "uvloop" or "asyncio": the event loop the server runs on. uvloop by default: each hop of a request
    # costs less on it (bench/external_engine.py measures the hops to a first token).
    event_loop: str = "uvloop"
    # Finished spans go to <trace_dir>/<service>.jsonl as JSON lines; "" = no file.
    # One variable for every service (the launcher sets it), hence no service prefix.
    trace_dir: str = Field(default="", validation_alias=AliasChoices(TRACE_DIR_ENV, "trace_dir"))
    # TLS (meshkit/tls.py); empty = plaintext. The certificate this server presents (the
    # gateway presents it to the internal services too), and the mesh CA: clients must
    # present a certificate it signed (tls_require_client_cert), and the gateway verifies
    # the internal services against it.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""
    tls_require_client_cert: bool = True
    # <tls_dir>/<service>.crt, <service>.key and ca.crt, for whatever the fields above leave
    # empty. One variable for every service, like trace_dir.
    tls_dir: str = Field(default="", validation_alias=AliasChoices(TLS_DIR_ENV, "tls_dir"))
    # Debugging only: prompts, answers and exception messages in logs and spans
    # (meshkit/content_capture.py). Off, they never leave the process; on, a WARNING at start.
    capture_content: bool = False

    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    def __init_subclass__(cls, service: str = "", **kwargs):
        super().__init_subclass__(**kwargs)
        if service:
            cls.service = service
            cls.model_config = SettingsConfigDict(
                frozen=True, extra="ignore", env_prefix=f"NLPMESH_{service.upper()}_"
            )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_ENV)
        if config_file:
            path = Path(config_file)
            if not path.is_file():
                raise FileNotFoundError(f"{CONFIG_ENV} names {path}, which is not a file")
            sources.append(
                TomlConfigSettingsSource(settings_cls, toml_file=path, toml_table_header=(cls.service,))
            )
        return tuple(sources)

    @classmethod
    def load(cls, **overrides):
        """Builds the settings from the environment and the config file."""
        settings = cls(**overrides)
        if settings.port == 0 and cls.service in DEFAULT_PORTS and "port" not in overrides:
            settings = settings.model_copy(update={"port": DEFAULT_PORTS[cls.service]})
        return settings

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
