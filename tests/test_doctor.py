"""`ragserve doctor` against a real server: all ok, a failed model with its error, the server down,
and a port taken by another program."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading

import pytest

from conftest import free_port, smollm_gguf_path, start_server, stop_server
from ragserve.client import ServerError


def doctor(*args: str) -> tuple[int, dict]:
    done = subprocess.run([sys.executable, "-m", "ragserve.cli.main", "doctor", "--json", *args],
                          capture_output=True, text=True, timeout=600, env={**os.environ})
    assert done.stdout.strip(), done.stderr
    return done.returncode, json.loads(done.stdout)


def finding(report: dict, check: str) -> dict:
    matches = [f for f in report["findings"] if f["check"] == check]
    assert matches, f"no {check!r} finding in {[f['check'] for f in report['findings']]}"
    return matches[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("doctor-home")
    running = start_server(home)
    running.launch(model_name="smol", model_type="LLM", model_path=smollm_gguf_path(), n_ctx=512)
    yield running
    stop_server(running.process)


def test_all_ok_with_a_running_server_and_a_ready_model(server):
    code, report = doctor("--home", str(server.home))  # full run: engines are imported in a subprocess
    assert code == 0, report
    assert report["ok"] is True
    assert not [f for f in report["findings"] if f["status"] == "fail"]
    assert finding(report, "server")["status"] == "ok" and server.url in finding(report, "server")["message"]
    assert finding(report, "model smol")["status"] == "ok" and "ready" in finding(report, "model smol")["message"]
    llama = finding(report, "engine llama.cpp")
    assert llama["status"] == "ok" and "imports" in llama["message"]
    port = server.url.rsplit(":", 1)[1]
    assert report["base_urls"]["host_base_url"] == f"{server.url}/v1"
    assert report["base_urls"]["docker_base_url"] == f"http://host.docker.internal:{port}/v1"
    # Bound to 127.0.0.1: the URL finding warns that Docker cannot reach it and says how to fix that.
    urls = finding(report, "urls")
    assert urls["status"] == "warn" and "--host 0.0.0.0" in urls["fix"]
    # RAGFlow's OpenAI client refuses an empty key: a keyless server is given any non-empty text.
    assert "API key: any non-empty text, e.g. EMPTY" in urls["message"]
    assert "leave empty" not in json.dumps(report)


def test_a_server_with_a_key_is_given_its_key_in_the_settings(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    running = start_server(home, env={"RAGSERVE_API_KEYS": "k-doctor"})
    try:
        code, report = doctor("--home", str(home), "--no-import-check", "--api-key", "k-doctor")
        assert finding(report, "server")["status"] == "ok", report
        assert "API key: the server's api_key" in finding(report, "urls")["message"]
        assert "EMPTY" not in report["base_urls"]["api_key"]
    finally:
        stop_server(running.process)


def test_a_failed_model_shows_its_error_and_the_fix(server, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(open(smollm_gguf_path(), "rb").read(8_000_000))  # header intact, tensor data cut off
    with pytest.raises(ServerError):
        server.launch(model_name="broken", model_type="LLM", model_path=str(broken))
    with server.client as client:
        error = client.describe_model("broken")["error"]
    assert error
    try:
        code, report = doctor("--home", str(server.home), "--no-import-check")
        assert code == 1
        failed = finding(report, "model broken")
        assert failed["status"] == "fail"
        assert error.splitlines()[0] in failed["message"]
        assert "ragserve terminate broken" in failed["fix"] and "worker-broken.log" in failed["fix"]
        assert finding(report, "model smol")["status"] == "ok"
    finally:
        with server.client as client:
            client.terminate("broken")


def test_server_down_names_ragserve_serve(tmp_path):
    home = tmp_path / "home"
    port = free_port()
    code, report = doctor("--home", str(home), "--port", str(port), "--no-import-check")
    assert code == 1
    down = finding(report, "server")
    assert down["status"] == "fail" and f"127.0.0.1:{port}" in down["message"]
    assert "ragserve serve" in down["fix"]
    assert finding(report, "port")["status"] == "ok"  # nothing else holds the port: serve can use it


class _NotRagserve(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the stdlib's name
        self.send_response(404)
        self.end_headers()
        self.wfile.write(b"not here")

    def log_message(self, *args):
        pass


def test_port_held_by_another_program_is_reported(tmp_path):
    other = http.server.HTTPServer(("127.0.0.1", 0), _NotRagserve)
    port = other.server_address[1]
    thread = threading.Thread(target=other.serve_forever, daemon=True)
    thread.start()
    try:
        code, report = doctor("--home", str(tmp_path / "home"), "--port", str(port), "--no-import-check")
    finally:
        other.shutdown()
    assert code == 1
    held = finding(report, "port")
    assert held["status"] == "fail"
    assert f"port {port}" in held["message"] and "not ragserve" in held["message"]
    assert f"pid {os.getpid()}" in held["message"]  # the program holding it is named
    assert "--port" in held["fix"]


def test_a_memory_limit_that_is_not_a_number_is_a_failed_check_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setenv("RAGSERVE_MEMORY_LIMIT_GB", "abc")
    code, report = doctor("--home", str(tmp_path / "home"))
    memory_finding = finding(report, "memory")
    assert memory_finding["status"] == "fail" and "RAGSERVE_MEMORY_LIMIT_GB='abc'" in memory_finding["message"]
    assert code != 0

