"""The `nlpmesh` command: up, down, ask, health, logs, demo, certs, keys, cache, redis-acl, trace, budgets, models."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nlpmesh_client import NlpmeshError

from cli import invalidate, keys, logs, models, redis_acl, run_state
from cli.ask import ask, build_question, response_format_from, timing_table
from cli.certs import DEFAULT_NAMESPACE, init_certs, rotate_certs
from cli.connect import GatewayAccess
from cli.launcher import EDGE, EMBEDDING, LocalMesh, check_health, check_http_health
from cli.restarts import RestartPolicy
from cli.topology import REPO_ROOT
from cli.traces import default_trace_dir, show_budgets, show_trace
from gateway.health_names import model_health_name
from meshkit.settings import TLS_DIR_ENV, default_home
from meshkit.tls import CA_FILE, probe_credentials

DEMO_QUESTION = "What are the applications of real-time AI in the financial industry?"
DEMO_SUPPORT = "Where is my order AB-1234? It was due last week."


def _state_file() -> Path:
    return default_home() / "run" / "mesh.json"


def _say(line: str) -> None:
    print(f"[nlpmesh] {line}", flush=True)


class _Stop(Exception):
    """A signal asked the launcher to stop."""


def _stop_on(signum, _frame) -> None:
    raise _Stop(signal.Signals(signum).name)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def cmd_up(args) -> int:
    if args.detach:
        return _up_detached(args)
    # Before anything starts: a SIGTERM (systemd, `timeout`, CI) or a closed terminal then runs
    # the same cleanup as Ctrl-C, at any point, model loading included.
    for sig in STOP_SIGNALS:
        signal.signal(sig, _stop_on)
    try:
        return _launch(args)
    except _Stop:  # arrived before the mesh existed
        return 130


def _launch(args) -> int:
    """The launcher: the mesh up, then supervised until a signal (from Ctrl-C, `nlpmesh down`, ...)."""
    state_file = _state_file()
    refusal = _another_mesh_up(state_file)
    if refusal:
        _say(refusal)
        return 1
    run_dir = default_home() / "run"
    mesh = LocalMesh(run_dir, free_ports=args.free_ports, progress=_say, tls=not args.plaintext,
                     keys_file=keys.default_keys_file(), api_key=keys.local_key(), restart=RestartPolicy(),
                     scale=_scale_of(args), models=_models_to_serve(args.model))
    try:
        _ = mesh.instances  # an unknown service or model, or a count out of range, stops here, before anything starts
    except ValueError as error:
        _say(str(error))
        return 2
    launcher = {"launcher": run_state.this_launcher(), "ready": False}
    mesh.on_change = lambda: run_state.write(state_file, {**mesh.state(), **launcher})
    run_state.write(state_file, launcher)  # claimed: a second `up` now refuses, `down` can stop this one
    run_state.claim(state_file)  # the same, should the state file be removed while this runs
    stopped_by = None
    try:
        mesh.start(ready_timeout_s=args.timeout)
        launcher["ready"] = True
        mesh.on_change()
        _announce(mesh, run_dir, args)
        while True:
            mesh.supervise()
            time.sleep(0.2)
    except _Stop as signal_name:
        stopped_by = signal_name
    except (RuntimeError, TimeoutError) as error:
        _say(f"failed: {error}")
        return 1
    finally:
        for sig in STOP_SIGNALS:  # the cleanup is bounded (grace, then SIGKILL): let it finish
            signal.signal(sig, signal.SIG_IGN)
        _say(f"stopping ({stopped_by})" if stopped_by else "stopping")
        mesh.stop()
        if run_state.written_by_me(run_state.read(state_file)):
            state_file.unlink(missing_ok=True)
        run_state.release(state_file)
        _say("stopped")
    return 0


def _another_mesh_up(state_file: Path) -> str | None:
    """Why `up` must refuse: another launcher of this home runs (by its state file, else by its pid file; with
    both removed, its ports refuse: cli/launcher.py). None when the home is free (a stale state file cleared)."""
    if not run_state.clear_if_stale(state_file, _say):
        return (f"a mesh is already up ({run_state.describe(run_state.read(state_file) or {})}); "
                "run `nlpmesh down` first")
    pid = run_state.running_launcher(state_file)
    if pid is not None:
        return (f"a mesh is already up (launcher pid {pid}, in {run_state.pid_file(state_file)}; its state file "
                f"{state_file} is gone); run `nlpmesh down` first")
    return None


def _scale_of(args) -> dict[str, int]:
    """--scale, with --inference-replicas as the inference replicas per model."""
    return {**args.scale, "inference": args.inference_replicas} if args.inference_replicas else args.scale


def _models_to_serve(requested: list[str]) -> tuple[str, ...]:
    """The models `up` and `demo` serve: those asked for (the first is the default), else every catalogue
    model the built-in engine can serve here, each one left out named with the reason."""
    if requested:
        return tuple(requested)
    servable, not_served = models.servable_models(default_home())
    for line in not_served:
        _say(f"not serving {line}")
    return tuple(servable)


def _announce(mesh: LocalMesh, run_dir: Path, args) -> None:
    _say(f"mesh ready: gateway at {mesh.gateway_address}; logs in {run_dir / 'logs'}")
    served = list(mesh.model_instances)
    _say(f"models: {', '.join(served)} (default {served[0]}); `nlpmesh ask --model ID` picks one, "
         "`nlpmesh health --all` shows each")
    _say(f"auth on: keys in {mesh.keys_file}; `nlpmesh ask` sends the local key ({keys.local_key_file()})")
    if EDGE in mesh.ports:
        _say(f"OpenAI-compatible API at {mesh.edge_url()}/v1 (the same key as Bearer; docs/openai.md)")
    if mesh.trace_dir is not None:
        _say(f"spans in {mesh.trace_dir}: `nlpmesh trace --last` draws the latest request, `nlpmesh budgets` sums up")
    for name in mesh.metrics_ports:
        _say(f"{name} metrics: {mesh.metrics_url(name)}")
    _say("a service that exits is restarted (backoff 0.5 s doubling to 30 s)")
    _say("running in the background; `nlpmesh down` stops it" if args.launcher_of_detached
         else "press Ctrl-C to stop")


def _up_detached(args) -> int:
    """Starts the launcher as a background process of its own session, shows its progress until the mesh is
    ready, and leaves it running: it supervises the mesh until `nlpmesh down` signals it."""
    state_file = _state_file()
    refusal = _another_mesh_up(state_file)
    if refusal:
        _say(refusal)
        return 1
    log_path = default_home() / "run" / "launcher.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "cli.main", "up", "--launcher-of-detached", "--timeout", str(args.timeout)]
    command += ["--free-ports"] * args.free_ports + ["--plaintext"] * args.plaintext
    command += [part for name, count in _scale_of(args).items() for part in ("--scale", f"{name}={count}")]
    command += [part for model in args.model for part in ("--model", model)]
    with log_path.open("w") as log:
        launcher = subprocess.Popen(command, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    shown = 0
    try:
        while True:
            text = log_path.read_text(errors="replace")
            complete = text[:text.rfind("\n") + 1]
            sys.stdout.write(complete[shown:])
            sys.stdout.flush()
            shown = len(complete)
            state = run_state.read(state_file) or {}
            if state.get("ready") and (state.get("launcher") or {}).get("pid") == launcher.pid:
                _say(f"running in the background (launcher pid {launcher.pid}, its log {log_path}); "
                     "`nlpmesh down` stops it")
                return 0
            if launcher.poll() is not None:
                sys.stdout.write(log_path.read_text(errors="replace")[shown:])
                _say(f"the launcher exited with code {launcher.returncode}")
                return 1
            time.sleep(0.1)
    except KeyboardInterrupt:
        _say("interrupted: stopping the launcher")
        launcher.terminate()
        launcher.wait(timeout=30)
        return 130


def cmd_down(args) -> int:
    if run_state.read(_state_file()) is None and run_state.running_launcher(_state_file()) is None:
        _say("no mesh is up")
        return 0
    stopped = run_state.stop(_state_file(), _say)
    _say(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    return 0


def _gateway_address(args) -> str:
    if args.addr:
        return args.addr
    return (run_state.read(_state_file()) or {}).get("gateway") or "127.0.0.1:50051"


def _tls_dir(args) -> Path | None:
    """The mesh's certificates: --tls-dir, else NLPMESH_TLS_DIR (as in the containers), else the running
    mesh's; None = plaintext."""
    if args.plaintext:
        return None
    chosen = args.tls_dir or os.environ.get(TLS_DIR_ENV) or (run_state.read(_state_file()) or {}).get("tls_dir")
    return Path(chosen) if chosen else None


def _gateway_access(args) -> GatewayAccess:
    tls_dir = _tls_dir(args)
    return GatewayAccess(_gateway_address(args), ca_file=tls_dir / CA_FILE if tls_dir else None,
                         api_key=keys.saved_api_key())


def _cache_address(args) -> str:
    if args.addr:
        return args.addr
    port = ((run_state.read(_state_file()) or {}).get("ports") or {}).get("cache")
    return f"127.0.0.1:{port}" if port else "127.0.0.1:50054"


def cmd_ask(args) -> int:
    variables = dict(v.split("=", 1) for v in args.var)
    if not args.template and not args.question:
        _say("give a question, or --template with --var name=value")
        return 2
    try:
        response_format = response_format_from(args.json_schema, args.regex)
    except (OSError, ValueError) as error:
        _say(f"ask: {error}")
        return 2
    question = build_question(args.question, args.template, variables, args.max_new_tokens,
                              args.temperature, args.seed, args.cache, args.model, response_format)
    try:
        result = ask(_gateway_access(args), question)
    except NlpmeshError as error:
        _say(f"{error.code.name}: {error.message}")
        return 1
    print(timing_table(result))
    return 0


def cmd_health(args) -> int:
    if args.http:
        tls_dir = _tls_dir(args)
        status = check_http_health(args.http, args.timeout, tls_dir / CA_FILE if tls_dir else None)
        print(status)
        return 0 if status == "SERVING" else 1
    if args.all:
        return _health_of_every_replica(args)
    service = args.service
    if args.model:
        service = model_health_name(args.model)
    status = check_health(_gateway_address(args), args.timeout, probe_credentials(_tls_dir(args)), service)
    print(status)
    return 0 if status == "SERVING" else 1


def _health_of_every_replica(args) -> int:
    """One line per process of the running mesh (each replica apart): name, address, health; then one per model
    served, as the gateway routes to it. 0 when all SERVING."""
    state = run_state.read(_state_file()) or {}
    ports = state.get("ports") or {}
    if not ports:
        _say("no mesh is up")
        return 1
    credentials = probe_credentials(_tls_dir(args))
    width = max(len(name) for name in ports)
    statuses = {}
    tls_dir = _tls_dir(args)
    for name, port in ports.items():
        if name == EDGE and state.get("edge"):
            statuses[name] = check_http_health(f"{state['edge']}/healthz", args.timeout,
                                               tls_dir / CA_FILE if tls_dir else None)
        else:
            statuses[name] = check_health(f"127.0.0.1:{port}", args.timeout, credentials)
        print(f"{name:<{width}}  127.0.0.1:{port:<5}  {statuses[name]}", flush=True)
    if state.get("models") and "gateway" in ports:
        for model in state["models"]:
            status = check_health(f"127.0.0.1:{ports['gateway']}", args.timeout, credentials, model_health_name(model))
            statuses[f"model {model}"] = status
            print(f"model {model}: {status} (the gateway's {model_health_name(model)})", flush=True)
    return 0 if all(status == "SERVING" for status in statuses.values()) else 1


def _scale(value: str) -> tuple[str, int]:
    name, sep, count = value.partition("=")
    if not sep or not name or not count.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r}: expected SERVICE=N, e.g. inference=2")
    return name, int(count)


class _ScaleAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        scale = dict(getattr(namespace, self.dest) or {})
        name, count = values
        scale[name] = count
        setattr(namespace, self.dest, scale)


def cmd_demo(args) -> int:
    """The main job: the mesh up with every model it can serve, the finance question answered twice by each
    (generated, then from the cache), timings shown."""
    run_dir = Path(tempfile.mkdtemp(prefix="nlpmesh-demo-"))
    served = _models_to_serve(args.model)
    _say(f"starting the mesh with {', '.join(served) or 'the default model'} "
         "(free local ports, private Redis when REDIS_URL is unset)")
    with LocalMesh(run_dir, free_ports=True, progress=_say, tls=not args.plaintext, models=served,
                   keys_file=keys.default_keys_file(), api_key=keys.local_key(), restart=RestartPolicy()) as mesh:
        mesh.supervise_in_background()
        for model in mesh.model_instances:
            if _demo_model(mesh, model, args.max_new_tokens) != 0:
                return 1
        if _demo_embeddings(mesh) != 0:
            return 1
        _say("stopping the mesh")
    return 0


def _demo_model(mesh: LocalMesh, model: str, max_new_tokens: int) -> int:
    """The finance question to ``model`` twice: generated (cache refresh), then the same request again."""
    for label, cache in (("first: generated (cache refresh)", "refresh"), ("second: the same request again", "use")):
        _say(f"model {model}, {label}\n> {DEMO_QUESTION}")
        question = build_question(DEMO_QUESTION, "finance_question", {"question": DEMO_QUESTION},
                                  max_new_tokens, 0.0, None, cache, model)
        started = time.perf_counter()
        try:
            result = ask(mesh.gateway_access(), question)
        except NlpmeshError as error:
            _say(f"model {model}: {error.code.name}: {error.message}")
            return 1
        print(timing_table(result))
        source = "the prompt cache" if result.cache_hit else "generated"
        _say(f"answered by model {result.model} ({source}); client-side wall time "
             f"{1000 * (time.perf_counter() - started):.2f} ms\n")
        if cache == "refresh":
            _say("the answer is stored after it was sent, off the caller's path; asking again in 0.5 s")
            time.sleep(0.5)
    return _demo_structured(mesh, model, max_new_tokens)


def _demo_structured(mesh: LocalMesh, model: str, max_new_tokens: int) -> int:
    """support_answer (its newest version declares a JSON Schema): the answer is JSON of that schema."""
    _say(f"model {model}, support_answer (guided decoding: its version declares a JSON Schema)\n> {DEMO_SUPPORT}")
    question = build_question(DEMO_SUPPORT, "support_answer", {"question": DEMO_SUPPORT},
                              max(max_new_tokens, 256), 0.0, None, "use", model)
    try:
        result = ask(mesh.gateway_access(), question)
        fields = json.loads(result.text)
    except NlpmeshError as error:
        _say(f"model {model}: {error.code.name}: {error.message}")
        return 1
    except ValueError:
        _say(f"model {model}: support_answer's answer is not JSON (finish={result.finish_reason})")
        return 1
    _say(f"structured: intent={fields.get('intent')!r} order_id={fields.get('order_id')!r}\n")
    return 0


# Which of these a support message is nearest to, by its embedding (Embed, the embedding replicas).
DEMO_INTENTS = ("Where is my parcel? Track a delivery.", "I want my money back for a double charge.",
                "How do I reset my password?")


def _demo_embeddings(mesh: LocalMesh) -> int:
    """The support message and three intents embedded in one Embed call; the nearest intent by cosine."""
    if EMBEDDING not in mesh.ports:
        _say("no embedding replica in this mesh (the embedding model is not unpacked: make setup)")
        return 0
    _say(f"Embed (the embedding replicas, all-MiniLM-L6-v2): which intent is nearest?\n> {DEMO_SUPPORT}")
    deadline = time.monotonic() + 60
    with mesh.gateway_access().client(timeout_s=30) as client:
        while True:
            try:
                result = client.embed([DEMO_SUPPORT, *DEMO_INTENTS])
                break
            except NlpmeshError as error:  # UNAVAILABLE until the gateway learnt the model
                if error.code.name != "UNAVAILABLE" or time.monotonic() > deadline:
                    _say(f"embeddings: {error.code.name}: {error.message}")
                    return 1
                time.sleep(0.5)
    message, *intents = result.vectors
    scores = [sum(a * b for a, b in zip(message, intent)) for intent in intents]  # unit vectors: the cosine
    for intent, score in sorted(zip(DEMO_INTENTS, scores), key=lambda pair: -pair[1]):
        print(f"  {score:.3f}  {intent}")
    hops = ", ".join(f"{t.hop} {t.elapsed_ms:.2f} ms" for t in result.timings)
    _say(f"{len(result.vectors)} vectors of {result.dimensions} from model {result.model} ({hops})\n")
    return 0


def cmd_certs_rotate(args) -> int:
    directory = Path(args.dir) if args.dir else default_home() / "certs"
    try:
        names = rotate_certs(directory, args.namespace)
    except FileNotFoundError as error:
        _say(str(error))
        return 1
    _say(f"certificates in {directory}: new {', '.join(names)} (the CA kept); servers serve them from their "
         "next new connection. redis-server reads its certificate at start only: restart it, or CONFIG SET "
         "tls-cert-file and tls-key-file")
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


def _model_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--model", action="append", default=[], metavar="ID",
                         help="a catalogue model to serve, the first the default; repeatable (default: every "
                              "catalogue model the built-in engine can serve here)")


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
    up.add_argument("--detach", action="store_true",
                    help="return once ready, the launcher left running in the background; `nlpmesh down` stops it")
    up.add_argument("--launcher-of-detached", action="store_true", help=argparse.SUPPRESS)
    up.add_argument("--free-ports", action="store_true", help="pick free ports instead of 50051-50055")
    up.add_argument("--timeout", type=float, default=600.0)
    up.add_argument("--scale", type=_scale, action=_ScaleAction, default={}, metavar="SERVICE=N",
                    help="run N replicas of SERVICE on ports of their own, balanced by the gateway "
                         "(like `docker compose up --scale`); repeatable")
    up.add_argument("--plaintext", action="store_true",
                    help="no TLS (default: TLS at the gateway, mTLS inside, certificates in $NLPMESH_HOME/certs)")
    _model_arguments(up)
    up.add_argument("--inference-replicas", type=int, default=0, metavar="N",
                    help="inference replicas per model (the same as --scale inference=N)")
    up.set_defaults(run=cmd_up)
    sub.add_parser("down", help="stop the running mesh (detached or not), or clear a stale state file"
                   ).set_defaults(run=cmd_down)
    a = sub.add_parser("ask", help="send a prompt, stream the answer, show per-hop timings")
    a.add_argument("question", nargs="?")
    a.add_argument("--template", help="template id, e.g. finance_question")
    a.add_argument("--var", action="append", default=[], metavar="NAME=VALUE")
    a.add_argument("--max-new-tokens", type=int, default=0)
    a.add_argument("--temperature", type=float, default=0.0)
    a.add_argument("--seed", type=int)
    a.add_argument("--cache", choices=["use", "bypass", "refresh"], default="use")
    a.add_argument("--json-schema", metavar="FILE", help="answer with JSON valid against this JSON Schema file")
    a.add_argument("--regex", help="answer with text that matches this regular expression (Rust syntax)")
    a.add_argument("--model", default="", help="a catalogue id, e.g. gemma3 (default: the mesh's default model)")
    a.add_argument("--addr", help="gateway address (default: the running mesh, else 127.0.0.1:50051)")
    _tls_arguments(a)
    a.set_defaults(run=cmd_ask)
    h = sub.add_parser("health", help="grpc.health.v1 status of a service")
    h.add_argument("--addr")
    h.add_argument("--service", default="",
                   help="a health name, e.g. nlpmesh.gateway.v1.Gateway/cache (default: the server as a whole)")
    h.add_argument("--timeout", type=float, default=2.0)
    h.add_argument("--model", metavar="ID",
                   help="a model's health as the gateway routes to it (nlpmesh.gateway.v1.Gateway/models/ID)")
    h.add_argument("--http", metavar="URL",
                   help="an HTTP service's health URL instead (the OpenAI edge's https://HOST:50056/healthz)")
    h.add_argument("--all", action="store_true",
                   help="every process of the running mesh, each replica apart, with its address and status, "
                        "then each model as the gateway routes to it")
    _tls_arguments(h)
    h.set_defaults(run=cmd_health)
    d = sub.add_parser("demo", help="the mesh up, the finance question answered twice by each model")
    d.add_argument("--max-new-tokens", type=int, default=128)
    d.add_argument("--plaintext", action="store_true", help="no TLS (default: TLS at the gateway, mTLS inside)")
    _model_arguments(d)
    d.set_defaults(run=cmd_demo)
    c = sub.add_parser("certs", help="development certificates for TLS at the gateway and mTLS inside")
    c_sub = c.add_subparsers(dest="certs_command", required=True)
    init = c_sub.add_parser("init", help="a CA and one certificate per service (kept if present)")
    init.add_argument("--dir", help="where (default: $NLPMESH_HOME/certs)")
    init.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="Kubernetes namespace in the names")
    init.add_argument("--force", action="store_true", help="replace every certificate and the CA")
    init.set_defaults(run=cmd_certs)
    rotate = c_sub.add_parser("rotate", help="new certificates for every service from the same CA; running "
                                             "servers serve them from their next connection, without a restart")
    rotate.add_argument("--dir", help="where (default: $NLPMESH_HOME/certs)")
    rotate.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="Kubernetes namespace in the names")
    rotate.set_defaults(run=cmd_certs_rotate)
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
    models.add_parser(sub)
    logs.add_parser(sub)
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
