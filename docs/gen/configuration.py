"""Writes docs/configuration.md from the settings classes: every variable once, with its type, default and meaning.

`python -m docs.gen.configuration` (or `make docs`) rewrites the page; `--check` exits 1 when the
committed page differs from what the classes give now (tests/unit/test_docs_configuration.py does the same).

Where a meaning comes from, first found wins:
1. the field's own `Field(description=...)`;
2. the comment written next to the field in its settings file (the lines right above it, or at the end of
   its line), read with `tokenize`: the settings files already explain most fields there, so the page
   quotes them instead of keeping a second copy;
3. for the inference service's engine options, the comment beside the same name in `EngineOptions`;
4. MEANINGS below, for the fields that have no comment at all. A test fails when an entry here names a
   field that has a comment or description (two copies) or no longer exists.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import os
import sys
import tokenize
import typing
from pathlib import Path

from pydantic.fields import FieldInfo

from meshkit.grpc_io import GRPC_EXPERIMENTS_ENV, MESH_GRPC_EXPERIMENTS

REPO_ROOT = Path(__file__).resolve().parents[2]
PAGE = REPO_ROOT / "docs" / "configuration.md"
HOME_SHOWN = "$NLPMESH_HOME"

# Meanings of the fields that carry neither a description nor a comment in their settings file.
MEANINGS: dict[str, dict[str, str]] = {
    "ServiceSettings": {
        "host": "The address the gRPC server binds.",
        "port": "The gRPC port; 0 takes the service's well-known port.",
        "grace_s": "On SIGTERM: how long calls in flight may run before they are cancelled.",
        "reflection": "Serve gRPC server reflection (`grpcurl list`).",
        "log_level": "The log level (`DEBUG`, `INFO`, `WARNING`, ...).",
        "max_message_bytes": "The largest gRPC message received or sent.",
        "tls_key_file": "The private key of `tls_cert_file`.",
        "tls_ca_file": "The mesh CA: a server that requires client certificates accepts only those it signed; "
                       "the gateway verifies the internal services against it (without it, it calls them in "
                       "plaintext).",
        "tls_require_client_cert": "Accept only clients presenting a certificate the mesh CA signed (mTLS).",
        "max_connection_age_grace_s": "After `max_connection_age_s`, how long the calls on a closed connection "
                                      "may still run.",
    },
    "GatewaySettings": {
        "template_addr": "The template service: an address, `dns:///name:port`, or a list of addresses.",
        "tokenizer_addr": "The tokenizer service, written as `template_addr`.",
        "cache_addr": "The cache service, written as `template_addr`.",
        "inference_addr": "The inference service, written as `template_addr`.",
        "cache_lookup_timeout_s": "The longest a prompt-cache lookup in Redis may take outside a request's "
                                  "budget; slower is a miss.",
        "auth_keys_file": "The keys file (TOML: per key id, its tenant, limits and the secret's sha256), "
                          "re-read when it changes.",
        "near_cache_max_age_s": "The longest an answer stays in the near tier.",
        "quota_timeout_s": "The longest a quota check in Redis may take; slower falls back to the local share.",
        "quota_replicas": "How many gateway replicas share the quotas: with Redis failing each holds a tenant "
                          "to its limit divided by this.",
        "quota_fallback_s": "After Redis failed, how long quotas are held locally before Redis is tried again.",
        "quota_stream_lease_s": "How long a stream's place counts against `--max-streams` without being "
                                "renewed (a replica that died frees it after this).",
        "admission_max_in_flight": "This gateway's ceiling on generations in flight; 0 = the capacity the "
                                   "inference service reports.",
        "admission_full_hold_s": "How long an inference report of *full* refuses new generations.",
        "admission_retry_after_s": "The `RetryInfo` delay of an admission refusal.",
        "cache_store_timeout_s": "The deadline of a store in the cache service (after the answer was sent).",
        "inference_timeout_s": "The deadline of calls to inference outside a request (its model info).",
        "catalog_refresh_s": "How often the template catalogue is read again from the template service.",
        "ready_timeout_s": "How long the gateway waits at start for the services behind it.",
        "downstream_health_timeout_s": "The deadline of each of those health checks.",
        "downstream_health_failures": "Failed checks in a row that turn the generation path NOT_SERVING.",
    },
    "EmbeddingSettings": {
        "home": "Where the unpacked embedding model is found (`models/<id>`).",
    },
    "CacheSettings": {
        "key_prefix": "Redis keys of the prompt cache start with this; the gateway must use the same.",
        "ttl_s": "How long a stored answer lives in Redis.",
        "max_answer_bytes": "Answers larger than this are not stored.",
    },
    "TemplateSettings": {
        "templates_dir": "The folder of template files (`<id>/<version>.toml`).",
        "max_render_chars": "The most characters one render may write, all its messages together.",
        "max_template_variables_chars": "The most characters a template's variables may hold, their "
                                        "`max_chars` summed.",
    },
    "TokenizerSettings": {
        "home": "Where the converted model (and its tokenizer) is found.",
        "max_messages": "The most messages one chat may hold (INVALID_ARGUMENT past it).",
        "max_message_chars": "The most characters one chat message may hold.",
        "max_chat_chars": "The most characters all messages of one chat may hold.",
    },
    "InferenceSettings": {
        "home": "Where the converted model is found.",
        "default_max_new_tokens": "New tokens generated when a request asks for 0.",
        "max_new_tokens_limit": "The most new tokens one request may ask for.",
        "max_stop_sequences": "The most stop sequences one request may give.",
        "max_stop_chars": "The most characters one stop sequence may hold.",
        "prefix_cache_bytes": "The in-process LRU of prefix-KV blocks, in bytes of KV tensors; 0 turns "
                              "prefix reuse off.",
        "redis_url": "The Redis of the shared prefix-KV tier; empty = no Redis tier.",
        "prefix_redis_cooldown_s": "After a slow or failed Redis read, or a refused write, how long Redis is "
                                   "skipped.",
        "prefix_redis_ttl_s": "How long a prefix-KV block lives in Redis.",
        "prefix_redis_seen_ttl_s": "How long the marker of a block's first sighting is kept in Redis.",
    },
}

# Variables read outside the settings classes. tests/unit/test_docs_configuration.py checks this list
# against the names the code under cli/, meshkit/, services/, gateway/ and promptcache/ reads.
OTHER_VARIABLES: list[tuple[str, str, str]] = [
    ("NLPMESH_CONFIG", "every service", "A TOML file of settings: a `[<service>]` table each, keys as the "
     "*config key* columns above; the environment wins over it."),
    ("NLPMESH_HOME", "every service, the CLI", "Where nlpmesh keeps the converted models (`models/<id>`), the "
     "run state (`run/`), local spans, certificates and keys; default `~/.cache/nlpmesh`."),
    ("NLPMESH_MODELS_FILE", "`python -m modelfiles`, `nlpmesh models`", "The model catalogue "
     "([Models](models.md)); default `deploy/models.toml` in the repository."),
    ("NLPMESH_API_KEY", "`nlpmesh ask`", "The API key to send, instead of the local mesh's "
     "`$NLPMESH_HOME/local.key`."),
    ("NLPMESH_REDIS_MAXMEMORY", "`nlpmesh up`, docker-compose", "`maxmemory` of the Redis started for the "
     "mesh, in Redis's syntax (`256mb`, `2gb`); evicting with `allkeys-lru`."),
    ("NLPMESH_REDIS_<USER>_PASSWORD", "`nlpmesh redis-acl`", "A Redis ACL user's password to keep instead "
     "of a random one (users: gateway, cache, inference, admin)."),
    ("NLPMESH_LAUNCHER_PID", "every service, set by the launcher", "The launcher that started this process; "
     "a service whose launcher is already gone exits at start."),
    ("OTEL_SDK_DISABLED", "every service", "`true` turns tracing off (trace ids are then all zeros)."),
    ("OTEL_TRACES_EXPORTER", "every service", "OpenTelemetry's exporter choice (`otlp`, `none`)."),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "every service", "Where spans go by OTLP, e.g. `http://host:4317`; "
     "unset = no OTLP export."),
    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "every service", "The same for traces only; wins over "
     "`OTEL_EXPORTER_OTLP_ENDPOINT`."),
]


@dataclasses.dataclass(frozen=True)
class Row:
    variables: tuple[str, ...]
    config_key: str
    type: str
    default: str
    meaning: str


def settings_classes() -> list[tuple[str, type]]:
    """(section title, class), the shared base first. Importing the inference settings imports torch."""
    from gateway.settings import GatewaySettings
    from meshkit.settings import ServiceSettings
    from services.cache.settings import CacheSettings
    from services.embedding.settings import EmbeddingSettings
    from services.inference.settings import InferenceSettings
    from services.openai_edge.settings import EdgeSettings
    from services.template.settings import TemplateSettings
    from services.tokenizer.settings import TokenizerSettings

    return [("Every service", ServiceSettings), ("gateway", GatewaySettings), ("template", TemplateSettings),
            ("tokenizer", TokenizerSettings), ("cache", CacheSettings), ("inference", InferenceSettings),
            ("edge", EdgeSettings), ("embedding", EmbeddingSettings)]


def field_comments(cls: type) -> dict[str, str]:
    """The comment next to each field the class body declares: the comment lines right above it,
    then one at the end of its line(s)."""
    source = inspect.getsource(cls)
    comments: dict[int, str] = {}
    comment_only: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row = token.start[0]
            comments[row] = token.string.lstrip("#").strip()
            if not token.line[:token.start[1]].strip():
                comment_only.add(row)
    body = ast.parse(source).body[0]
    found: dict[str, str] = {}
    for node in body.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above = []
        row = node.lineno - 1
        while row in comment_only:
            above.insert(0, comments[row])
            row -= 1
        trailing = [comments[r] for r in range(node.lineno, node.end_lineno + 1)
                    if r in comments and r not in comment_only]
        text = " ".join(above + trailing).strip()
        if text:
            found[node.target.id] = text
    return found


def declared_fields(cls: type) -> list[str]:
    """The fields this class body itself declares (a base's fields belong to the base's section)."""
    body = ast.parse(inspect.getsource(cls)).body[0]
    return [node.target.id for node in body.body
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
            and node.target.id in cls.model_fields]


def engine_comments() -> dict[str, str]:
    from services.inference.engine import EngineOptions
    return field_comments(EngineOptions)


def meaning_of(cls: type, name: str, field: FieldInfo, comments: dict[str, str]) -> str:
    if field.description:
        return field.description
    if name in comments:
        return _sentence(comments[name])
    if cls.__name__ == "InferenceSettings":
        engine = engine_comments()
        if name in engine:
            return _sentence(engine[name])
    return MEANINGS.get(cls.__name__, {}).get(name, "")


def _sentence(text: str) -> str:
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", ")", ":")) else text + "."


def env_names(cls: type, name: str, field: FieldInfo, service: str) -> tuple[str, ...]:
    alias = field.validation_alias
    if alias is not None:
        choices = getattr(alias, "choices", [alias])
        return tuple(c for c in choices if isinstance(c, str) and c.isupper())
    prefix = f"NLPMESH_{service.upper()}_" if service else "NLPMESH_<SERVICE>_"
    return (prefix + name.upper(),)


def type_of(field: FieldInfo) -> str:
    annotation = field.annotation
    if typing.get_origin(annotation) is typing.Literal:
        text = "one of " + ", ".join(f"`{v}`" for v in typing.get_args(annotation))
    else:
        text = getattr(annotation, "__name__", str(annotation))
        text = {"Path": "path", "str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(text, text)
    bounds = []
    for item in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(item, attr, None) is not None:
                bounds.append(f"{sign} {getattr(item, attr)}")
    return text + (f" ({', '.join(bounds)})" if bounds else "")


def default_of(cls: type, name: str, field: FieldInfo) -> str:
    from meshkit.settings import DEFAULT_PORTS
    if cls.__name__ == "ServiceSettings" and name == "port":
        return "the service's: " + ", ".join(f"{svc} {port}" for svc, port in DEFAULT_PORTS.items())
    if field.default_factory is not None:
        # The factories read NLPMESH_HOME and the checkout's path: show them as names, not this machine's.
        saved = os.environ.get("NLPMESH_HOME")
        os.environ["NLPMESH_HOME"] = HOME_SHOWN
        try:
            value = field.default_factory()
        finally:
            if saved is None:
                os.environ.pop("NLPMESH_HOME")
            else:
                os.environ["NLPMESH_HOME"] = saved
        return f"`{str(value).replace(str(REPO_ROOT), '<repo>')}`"
    value = field.default
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value == "":
        return "empty"
    return f"`{value}`"


def rows(title: str, cls: type) -> list[Row]:
    service = getattr(cls, "service", "")
    comments = field_comments(cls)
    out = []
    for name in declared_fields(cls):
        field = cls.model_fields[name]
        key = f"`[{service or '<service>'}]` `{name}`"
        out.append(Row(env_names(cls, name, field, service), key, type_of(field), default_of(cls, name, field),
                       meaning_of(cls, name, field, comments)))
    return out


def _cell(text: str) -> str:
    """Table-safe markdown: pipes escaped, and outside code spans `<` and `>` as entities (a comment's
    `<trace_dir>/<service>.jsonl` is not an HTML tag)."""
    parts = text.replace("|", "\\|").replace("\n", " ").split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


HEADER = f"""# Configuration reference

<!-- Generated by `python -m docs.gen.configuration` from the settings classes (`make docs`).
     Do not edit by hand: tests/unit/test_docs_configuration.py fails when this page is stale. -->

Each service builds one frozen settings object when it starts (`meshkit/settings.py`), from,
strongest first: its environment variables, the TOML file named by `NLPMESH_CONFIG` (one
`[<service>]` table per service, keys as in the *config key* column), then the defaults below.
Nothing is read at import time. A variable is `NLPMESH_<SERVICE>_<FIELD>`, except where a row
names others (`REDIS_URL`, `NLPMESH_TRACE_DIR`, `NLPMESH_TLS_DIR`).

This page is generated from the settings classes. A meaning is the field's description, else the
comment written next to it in its settings file, else a line kept in `docs/gen/configuration.py`
for the fields the code leaves unexplained.

One variable is gRPC's own, read by gRPC when a process imports it, so it is not a setting:
`{GRPC_EXPERIMENTS_ENV}`. The launcher and the image (`Dockerfile`) start every service with
`{GRPC_EXPERIMENTS_ENV}={MESH_GRPC_EXPERIMENTS}`: the thread that polls gRPC's completion queue
does the socket I/O itself, one thread less on each event of a hop (`meshkit/grpc_io.py`;
`cache_hit_c1[grpc_default_io]` on the [performance page](performance.md) is a gateway without it).
A value of your own in the environment is kept; an empty one gives gRPC's defaults. Each service
names the value in its `listening on` log line.
"""

SECTION_INTRO = {
    "Every service": "Declared in `meshkit/settings.py` (`ServiceSettings`); every service has them, "
                     "with its own prefix: `NLPMESH_GATEWAY_GRACE_S`, `NLPMESH_INFERENCE_GRACE_S`, ...",
    "gateway": "`gateway/settings.py` (`GatewaySettings`).",
    "template": "`services/template/settings.py` (`TemplateSettings`).",
    "tokenizer": "`services/tokenizer/settings.py` (`TokenizerSettings`).",
    "cache": "`services/cache/settings.py` (`CacheSettings`).",
    "inference": "`services/inference/settings.py` (`InferenceSettings`).",
    "edge": "`services/openai_edge/settings.py` (`EdgeSettings`): the OpenAI-compatible HTTP edge (docs/openai.md). "
            "Of the shared settings it uses host, port, grace_s, log_level, log_format, metrics_port, event_loop and "
            "the TLS ones.",
    "embedding": "`services/embedding/settings.py` (`EmbeddingSettings`): the embedding replicas (docs/embeddings.md).",
}


def render() -> str:
    lines = [HEADER]
    for title, cls in settings_classes():
        lines += [f"## {title}", "", SECTION_INTRO[title], "",
                  "| variable | config key | type | default | meaning |", "|---|---|---|---|---|"]
        for row in rows(title, cls):
            names = "<br>".join(f"`{n}`" for n in row.variables)
            lines.append(f"| {names} | {row.config_key} | {_cell(row.type)} | {_cell(row.default)} | "
                         f"{_cell(row.meaning)} |")
        lines.append("")
    lines += ["## Outside the settings classes", "",
              "Read directly by the code named; kept by hand in `docs/gen/configuration.py`, and checked by a "
              "test against the names the code reads.", "",
              "| variable | read by | meaning |", "|---|---|---|"]
    for name, where, meaning in OTHER_VARIABLES:
        lines.append(f"| `{name}` | {where} | {_cell(meaning)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m docs.gen.configuration", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page differs, write nothing")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if PAGE.read_text() != text:
            print(f"{PAGE.relative_to(REPO_ROOT)} is stale: run `make docs`", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    print(f"written {PAGE.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
