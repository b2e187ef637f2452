"""The `nlpmesh` command: up, down, ask, health, demo, certs, keys, cache, redis-acl, trace, budgets."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import grpc

from cli import invalidate, keys, redis_acl
from cli.ask import ask, build_request, timing_table
from cli.certs import DEFAULT_NAMESPACE, init_certs
from cli.connect import GatewayAccess
from cli.launcher import LocalMesh, check_health, stop_detached
from cli.traces import default_trace_dir, show_budgets, show_trace
from meshkit.settings import TLS_DIR_ENV, default_home
from meshkit.tls import CA_FILE, probe_credentials

DEMO_QUESTION = "What are the applications of real-time AI in the financial industry?"


def _state_file() -> Path:
    return default_home() / "run" / "mesh.json"


def _say(line: str) -> None:
    print(f"[nlpmesh] {line}", flush=True)


def cmd_up(args) -> int:
    if _state_file().exists():
        _say(f"a mesh is already up (state in {_state_file()}); run `nlpmesh down` first")
        return 1
    run_dir = default_home() / "run"
    mesh = LocalMesh(run_dir, free_ports=args.free_ports, progress=_say, detach=args.detach, tls=not args.plaintext,
                     keys_file=keys.default_keys_file(), api_key=keys.local_key())
    try:
        mesh.start(ready_timeout_s=args.timeout)
    except (RuntimeError, TimeoutError) as error:
        _say(f"failed: {error}")
        mesh.stop()
        return 1
    _say(f"mesh ready: gateway at {mesh.gateway_address}; logs in {run_dir / 'logs'}")
    _say(f"auth on: keys in {mesh.keys_file}; `nlpmesh ask` sends the local key ({keys.local_key_file()})")
    if mesh.trace_dir is not None:
        _say(f"spans in {mesh.trace_dir}: `nlpmesh trace --last` draws the latest request, `nlpmesh budgets` sums up")
    for name in mesh.metrics_ports:
        _say(f"{name} metrics: {mesh.metrics_url(name)}")
    if args.detach:
        mesh.save_state(_state_file())
        _say("running in the background; `nlpmesh down` stops it")
        return 0
    mesh.save_state(_state_file())
    _say("press Ctrl-C to stop")
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        _say("stopping")
        mesh.stop()
        _state_file().unlink(missing_ok=True)
    return 0


def cmd_down(args) -> int:
    if not _state_file().exists():
        _say("no mesh is up")
        return 1
    _say(f"stopped: {', '.join(stop_detached(_state_file()))}")
    return 0


def _gateway_address(args) -> str:
    if args.addr:
        return args.addr
    if _state_file().exists():
        return json.loads(_state_file().read_text())["gateway"]
    return "127.0.0.1:50051"


def _tls_dir(args) -> Path | None:
    """The mesh's certificates: --tls-dir, else NLPMESH_TLS_DIR (as in the containers), else the running
    mesh's; None = plaintext."""
    if args.plaintext:
        return None
    chosen = args.tls_dir or os.environ.get(TLS_DIR_ENV)
    if not chosen and _state_file().exists():
        chosen = json.loads(_state_file().read_text()).get("tls_dir")
    return Path(chosen) if chosen else None


def _gateway_access(args) -> GatewayAccess:
    tls_dir = _tls_dir(args)
    return GatewayAccess(_gateway_address(args), ca_file=tls_dir / CA_FILE if tls_dir else None,
                         api_key=keys.saved_api_key())


def _cache_address(args) -> str:
    if args.addr:
        return args.addr
    if _state_file().exists():
        import json
        return f"127.0.0.1:{json.loads(_state_file().read_text())['ports']['cache']}"
    return "127.0.0.1:50054"


def cmd_ask(args) -> int:
    variables = dict(v.split("=", 1) for v in args.var)
    if not args.template and not args.question:
        _say("give a question, or --template with --var name=value")
        return 2
    cache_mode = {"use": 1, "bypass": 2, "refresh": 3}[args.cache]
    request = build_request(args.question, args.template, variables, args.max_new_tokens,
                            args.temperature, args.seed, cache_mode)
    try:
        result = ask(_gateway_access(args), request)
    except grpc.RpcError as error:
        _say(f"{error.code().name}: {error.details()}")
        return 1
    print(timing_table(result))
    return 0


def cmd_health(args) -> int:
    status = check_health(_gateway_address(args), args.timeout, probe_credentials(_tls_dir(args)))
    print(status)
    return 0 if status == "SERVING" else 1


def cmd_demo(args) -> int:
    """The main job: the mesh up, the finance question answered twice, timings shown."""
    run_dir = Path(tempfile.mkdtemp(prefix="nlpmesh-demo-"))
    _say("starting the mesh (free local ports, private Redis when REDIS_URL is unset)")
    with LocalMesh(run_dir, free_ports=True, progress=_say, tls=not args.plaintext,
                   keys_file=keys.default_keys_file(), api_key=keys.local_key()) as mesh:
        for label, mode in (("first: generated (cache refresh)", 3), ("second: the same request again", 1)):
            _say(f"{label}\n> {DEMO_QUESTION}")
            request = build_request(DEMO_QUESTION, "finance_question", {"question": DEMO_QUESTION},
                                    args.max_new_tokens, 0.0, None, mode)
            started = time.perf_counter()
            try:
                result = ask(mesh.gateway_access(), request)
            except grpc.RpcError as error:
                _say(f"{error.code().name}: {error.details()}")
                return 1
            print(timing_table(result))
            _say(f"client-side wall time {1000 * (time.perf_counter() - started):.2f} ms\n")
            if mode == 3:
                _say("the answer is stored after it was sent, off the caller's path; asking again in 0.5 s")
                time.sleep(0.5)
        _say("stopping the mesh")
    return 0


def cmd_certs(args) -> int:
    directory = Path(args.dir) if args.dir else default_home() / "certs"
    try:
        report = init_certs(directory, args.namespace, args.force)
    except FileExistsError as error:
        _say(str(error))
        return 1
    _say(f"certificates in {directory}: made {', '.join(report.made) or 'none'}; "
         f"kept {', '.join(report.kept) or 'none'}")
    return 0


def _tls_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--tls-dir",
                         help="the mesh's certificates (default: $NLPMESH_TLS_DIR, else the running mesh's)")
    command.add_argument("--plaintext", action="store_true", help="no TLS")


def cmd_trace(args) -> int:
    if (args.trace_id is None) == (not args.last):
        _say("give a trace id, or --last")
        return 2
    code, text = show_trace(Path(args.dir) if args.dir else default_trace_dir(), args.trace_id, args.width)
    print(text)
    return code


def cmd_budgets(args) -> int:
    code, text = show_budgets(Path(args.dir) if args.dir else default_trace_dir(), args.last)
    print(text)
    return code


def cmd_redis_acl(args) -> int:
    try:
        acl, env = redis_acl.generate(Path(args.out), args.host, args.port, rotate=args.rotate)
    except ValueError as error:
        _say(f"failed: {error}")
        return 1
    _say(f"{acl}: the Redis users, passwords as sha256 hashes (redis-server --aclfile {acl})")
    _say(f"{env}: their passwords and URLs (secret, mode 0600); for docker compose: cp {env} .env")
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="nlpmesh", description="A gRPC mesh for real-time NLP")
    sub = root.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run the mesh locally (the docker-compose topology as processes)")
    up.add_argument("--detach", action="store_true", help="return once ready; `nlpmesh down` stops it")
    up.add_argument("--free-ports", action="store_true", help="pick free ports instead of 50051-50055")
    up.add_argument("--timeout", type=float, default=600.0)
    up.add_argument("--plaintext", action="store_true",
                    help="no TLS (default: TLS at the gateway, mTLS inside, certificates in $NLPMESH_HOME/certs)")
    up.set_defaults(run=cmd_up)
    sub.add_parser("down", help="stop a mesh started with --detach").set_defaults(run=cmd_down)
    a = sub.add_parser("ask", help="send a prompt, stream the answer, show per-hop timings")
    a.add_argument("question", nargs="?")
    a.add_argument("--template", help="template id, e.g. finance_question")
    a.add_argument("--var", action="append", default=[], metavar="NAME=VALUE")
    a.add_argument("--max-new-tokens", type=int, default=0)
    a.add_argument("--temperature", type=float, default=0.0)
    a.add_argument("--seed", type=int)
    a.add_argument("--cache", choices=["use", "bypass", "refresh"], default="use")
    a.add_argument("--addr", help="gateway address (default: the running mesh, else 127.0.0.1:50051)")
    _tls_arguments(a)
    a.set_defaults(run=cmd_ask)
    h = sub.add_parser("health", help="grpc.health.v1 status of a service")
    h.add_argument("--addr")
    h.add_argument("--timeout", type=float, default=2.0)
    _tls_arguments(h)
    h.set_defaults(run=cmd_health)
    d = sub.add_parser("demo", help="the mesh up, the finance question answered twice")
    d.add_argument("--max-new-tokens", type=int, default=128)
    d.add_argument("--plaintext", action="store_true", help="no TLS (default: TLS at the gateway, mTLS inside)")
    d.set_defaults(run=cmd_demo)
    c = sub.add_parser("certs", help="development certificates for TLS at the gateway and mTLS inside")
    c_sub = c.add_subparsers(dest="certs_command", required=True)
    init = c_sub.add_parser("init", help="a CA and one certificate per service (kept if present)")
    init.add_argument("--dir", help="where (default: $NLPMESH_HOME/certs)")
    init.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="Kubernetes namespace in the names")
    init.add_argument("--force", action="store_true", help="replace every certificate and the CA")
    init.set_defaults(run=cmd_certs)
    t = sub.add_parser("trace", help="draw one request's spans as a waterfall, with hop budgets and overruns")
    t.add_argument("trace_id", nargs="?", help="the trace_id a response carries")
    t.add_argument("--last", action="store_true", help="the most recent request instead")
    t.add_argument("--dir", help="the span files' folder (default: $NLPMESH_TRACE_DIR, else $NLPMESH_HOME/run/traces)")
    t.add_argument("--width", type=int, default=40, help="timeline width in characters")
    t.set_defaults(run=cmd_trace)
    b = sub.add_parser("budgets", help="per-hop p50/p95/p99 against budget over recent requests")
    b.add_argument("--last", type=int, default=100, metavar="N", help="how many recent requests (default 100)")
    b.add_argument("--dir", help="the span files' folder (default as for `trace`)")
    b.set_defaults(run=cmd_budgets)
    keys.add_parser(sub)
    invalidate.add_parser(sub, run=lambda args: invalidate.cmd_invalidate(args, _cache_address(args)))
    r = sub.add_parser("redis-acl", help="write the Redis users (users.acl, hashed) and their passwords (redis.env)")
    r.add_argument("--out", required=True, help="the folder to write into, e.g. .redis (docker-compose.yml mounts it)")
    r.add_argument("--host", default="redis", help="Redis host in the URLs written (default: redis, as in compose)")
    r.add_argument("--port", type=int, default=6379)
    r.add_argument("--rotate", action="store_true", help="new passwords, even where OUT/redis.env has some")
    r.set_defaults(run=cmd_redis_acl)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
