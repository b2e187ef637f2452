"""The launcher's restart backoff, its state and pid files, its ports, and the bounds of its private Redis, without
starting a mesh."""
import os
import socket
import subprocess
import sys
import time

import pytest
import redis

from cli import run_state
from cli.launcher import LocalMesh, PortTaken
from cli.processes import same_process, start_time
from cli.restarts import Backoff, RestartPolicy
from cli.topology import ServiceDef, compose_redis_server_args
from meshkit.server import LAUNCHER_PID_ENV, PORT_IN_USE_EXIT, launcher_is_gone


def test_restart_delays_double_up_to_the_bound_and_reset_after_a_long_run():
    backoff = Backoff(RestartPolicy(first_delay_s=0.5, max_delay_s=4.0, reset_after_s=30.0))
    assert [backoff.delay_after(1.0) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.delay_after(31.0) == 0.5
    assert backoff.delay_after(1.0) == 1.0
    assert backoff.restarts == 8


def test_a_pid_is_the_same_process_only_with_the_same_start_time():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        started = start_time(child.pid)
        assert started and same_process(child.pid, started)
        assert not same_process(child.pid, str(int(started) + 1))  # a later process under a reused pid
    finally:
        child.kill()
        child.wait()
    assert start_time(child.pid) is None and not same_process(child.pid, started)


def test_a_state_file_whose_launcher_is_gone_is_stale_and_what_it_left_is_stopped(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    leftover = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    path = tmp_path / "mesh.json"
    run_state.write(path, {"launcher": {"pid": gone.pid, "started": "1"}, "gateway": "127.0.0.1:1",
                           "pids": {"gateway": leftover.pid}, "started": {"gateway": start_time(leftover.pid)}})
    said = []
    try:
        assert run_state.clear_if_stale(path, said.append, grace_s=5.0)
        assert leftover.wait(timeout=10) != 0
    finally:
        leftover.kill()
    assert not path.exists()
    assert "stale" in said[0] and f"gateway (pid {leftover.pid})" in said[0]


def test_a_state_file_of_a_running_launcher_is_not_stale(tmp_path):
    path = tmp_path / "mesh.json"
    run_state.write(path, {"launcher": run_state.this_launcher(), "pids": {}})
    assert not run_state.clear_if_stale(path, print)
    assert path.exists() and run_state.written_by_me(run_state.read(path))


def test_a_state_file_that_does_not_parse_is_stale(tmp_path):
    path = tmp_path / "mesh.json"
    path.write_text("{half")
    assert run_state.clear_if_stale(path, lambda line: None) and not path.exists()


def test_the_private_redis_is_bounded_and_evicts_least_recently_used(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("NLPMESH_REDIS_MAXMEMORY", "64mb")
    mesh = LocalMesh(tmp_path, free_ports=True, services=[], progress=lambda line: None)
    mesh.start(ready_timeout_s=5)
    try:
        with redis.Redis.from_url(mesh.resolved_redis_url) as admin:
            assert admin.config_get("maxmemory")["maxmemory"] == str(64 * 1024 * 1024)
            assert admin.config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"
    finally:
        mesh.stop()


def test_the_compose_redis_is_bounded_the_same_way():
    command = compose_redis_server_args()
    assert command[command.index("--maxmemory") + 1] == "${NLPMESH_REDIS_MAXMEMORY:-256mb}"
    assert command[command.index("--maxmemory-policy") + 1] == "allkeys-lru"



def test_a_service_whose_launcher_died_before_arming_its_signal_does_not_start(tmp_path):
    # The service is started as the launcher starts it, but by this test's process: its parent is
    # not the launcher pid it is given, as after a launcher died between fork and setpriv's prctl.
    env = {**os.environ, LAUNCHER_PID_ENV: str(os.getpid() + 100000), "NLPMESH_TEMPLATE_PORT": "0"}
    done = subprocess.run([sys.executable, "-m", "services.template"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1
    assert "the launcher that started this service" in done.stderr
    assert launcher_is_gone() is False  # this test's own parent was never named


def sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_a_pid_file_names_a_running_launcher_only_while_that_very_process_runs(tmp_path):
    path = tmp_path / "mesh.json"
    launcher = sleeper()
    try:
        run_state.write(run_state.pid_file(path), {"launcher": {"pid": launcher.pid,
                                                               "started": start_time(launcher.pid)}})
        assert run_state.running_launcher(path) == launcher.pid
        # The same pid with another start time is another process (a recycled pid): never it.
        run_state.write(run_state.pid_file(path), {"launcher": {"pid": launcher.pid, "started": "1"}})
        assert run_state.running_launcher(path) is None
        assert not run_state.pid_file(path).exists()  # stale: removed
        assert launcher.poll() is None
    finally:
        launcher.kill()
        launcher.wait()


def test_down_without_a_state_file_stops_the_launcher_its_pid_file_names(tmp_path):
    path = tmp_path / "mesh.json"
    launcher = sleeper()
    said = []
    try:
        run_state.write(run_state.pid_file(path), {"launcher": {"pid": launcher.pid,
                                                               "started": start_time(launcher.pid)}})
        assert run_state.stop(path, said.append, grace_s=2.0) == ["launcher"]
        assert launcher.wait(timeout=10) != 0
        assert f"(pid {launcher.pid}) runs: stopping it" in said[0]
        assert not run_state.pid_file(path).exists()
        assert run_state.stop(path, said.append) == []  # nothing left to stop
    finally:
        launcher.kill()


def test_this_launchers_own_pid_file_is_its_to_release_and_no_refusal_of_itself(tmp_path):
    path = tmp_path / "mesh.json"
    run_state.claim(path)
    assert run_state.running_launcher(path) is None  # it is this process
    run_state.release(path)
    assert not run_state.pid_file(path).exists()


def a_service_on(port: int, metrics_port: int = 0) -> ServiceDef:
    return ServiceDef("template", (sys.executable, "-c", "pass"), {}, port, (), metrics_port)


def test_a_mesh_whose_port_another_process_holds_starts_nothing_and_says_which_port(tmp_path, monkeypatch):
    monkeypatch.setenv("REDIS_URL", "")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        mesh = LocalMesh(tmp_path, services=[a_service_on(port)], progress=lambda line: None)
        with pytest.raises(PortTaken, match=f"template \\(port {port}\\)"):
            mesh.start(ready_timeout_s=5)
        assert mesh.processes == {} and not mesh.log_path("template").exists()


def test_a_process_that_exited_because_its_port_is_taken_is_not_restarted(tmp_path):
    said = []
    mesh = LocalMesh(tmp_path, services=[a_service_on(1)], progress=said.append, restart=RestartPolicy())
    (tmp_path / "logs").mkdir()
    mesh.processes["template"] = taken = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({PORT_IN_USE_EXIT})"])
    taken.wait()
    mesh._started_at["template"] = time.monotonic()
    with pytest.raises(PortTaken, match="template: exited because another process holds its port"):
        mesh.supervise()
    mesh.supervise()  # given up: neither restarted nor refused again
    assert mesh.processes["template"] is taken and not any("restart" in line for line in said)
