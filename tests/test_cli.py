"""The edge-llm command: start-up refusals, serve/stop, and the terminal clients."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import Hold, ServeProcess

from edge_llm import models

CLI = [sys.executable, "-m", "edge_llm"]


def run_cli(*args: str, stdin: str = "", timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args], input=stdin, capture_output=True, text=True, timeout=timeout
    )


def test_missing_model_is_refused_with_what_to_do(tmp_path: Path) -> None:
    result = run_cli("serve", "--model", str(tmp_path / "nope.gguf"), "--port", "0")
    assert result.returncode == 2
    assert f"model file not found: {tmp_path / 'nope.gguf'}" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_default_model_says_run_fetch_model(tmp_path: Path) -> None:
    env = {**os.environ, "EDGE_LLM_MODELS_DIR": str(tmp_path)}
    result = subprocess.run(
        [*CLI, "serve", "--port", "0"], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 2
    assert "edge-llm fetch-model default" in result.stderr


def test_non_gguf_file_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_text("this is not a model\n")
    result = run_cli("serve", "--model", str(bogus), "--port", "0")
    assert result.returncode == 2
    assert "not a GGUF file" in result.stderr
    assert "Traceback" not in result.stderr


def test_truncated_gguf_is_refused_at_start_up(tmp_path: Path, tiny_model: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_model.read_bytes()[: tiny_model.stat().st_size // 2])
    result = run_cli("serve", "--model", str(cut), "--port", "0")
    assert result.returncode == 1
    assert "could not load" in result.stderr and str(cut) in result.stderr
    assert "truncated" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_setting_is_refused(tiny_model: Path) -> None:
    result = run_cli("serve", "--model", str(tiny_model), "--queue-depth", "0")
    assert result.returncode == 2
    assert "queue_depth must be > 0" in result.stderr


def test_serve_becomes_healthy_and_stops_on_sigterm(tiny_model: Path) -> None:
    server = ServeProcess(tiny_model)
    try:
        server.wait_until_serving()
    finally:
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0


def test_generate_streams_to_stdout(server) -> None:
    address = f"127.0.0.1:{server.port}"
    result = run_cli(
        "generate",
        "--address",
        address,
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--stats",
        "Say hi",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "completion tokens" in result.stderr


def test_generate_reports_server_errors_clearly(server) -> None:
    result = run_cli("generate", "--address", f"127.0.0.1:{server.port}", "--max-tokens", "0", "x")
    assert result.returncode == 1
    assert "INVALID_ARGUMENT: max_tokens" in result.stderr


def test_client_without_server_says_so() -> None:
    result = run_cli("info", "--address", "127.0.0.1:1")
    assert result.returncode == 1
    assert "no edge-llm server at 127.0.0.1:1" in result.stderr


def test_info_json(server) -> None:
    result = run_cli("info", "--json", "--address", f"127.0.0.1:{server.port}")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model"]["architecture"] == "llama"


def test_chat_keeps_the_conversation_in_a_session_it_can_resume(server) -> None:
    address = f"127.0.0.1:{server.port}"
    before = len(server.core.loaded.scheduler.recent)
    result = run_cli(
        "chat",
        "--address",
        address,
        "--max-tokens",
        "8",
        "--system",
        "Be brief.",
        stdin="Hello there\nAnd again\n",
    )
    assert result.returncode == 0, result.stderr
    session_id = result.stderr.split("session ", 1)[1].split()[0]
    jobs = list(server.core.loaded.scheduler.recent)[before:]
    # Turn 2 carries turn 1, from the server's copy of the conversation.
    assert [len(j.request.messages) for j in jobs] == [2, 4]
    assert jobs[1].request.messages[1].content == "Hello there"
    assert jobs[1].request.messages[2].role == "assistant"
    assert {j.request.session_id for j in jobs} == {session_id}

    resumed = run_cli("chat", "--address", address, "--session", session_id, stdin="Third\n")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith("> Hello there\n")  # the history, shown again
    assert len(server.core.loaded.scheduler.recent[-1].request.messages) == 6

    listed = run_cli("sessions", "list", "--address", address)
    assert session_id in listed.stdout and "6 messages" in listed.stdout
    shown = run_cli("sessions", "show", session_id, "--address", address)
    assert shown.stdout.splitlines()[:2] == ["[system] Be brief.", "[user] Hello there"]
    assert run_cli("sessions", "rm", session_id, "--address", address).returncode == 0
    gone = run_cli("sessions", "show", session_id, "--address", address)
    assert gone.returncode == 1 and "NOT_FOUND" in gone.stderr
    assert run_cli("sessions", "rm", "--address", address).returncode == 2  # no id


@pytest.mark.parametrize("name", ["tiny"])
def test_fetch_model_does_not_download_twice(name: str) -> None:
    result = run_cli("fetch-model", name, "--print-path", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "downloading" not in result.stderr
    assert "SHA-256 matches" in result.stderr
    assert Path(result.stdout.strip()).is_file()


def test_fetch_model_fetches_the_configured_model(tmp_path: Path) -> None:
    """Without a name, `fetch-model` fetches what `serve` would load (packaging/install and
    the Debian package's post-install run it so)."""
    config = tmp_path / "config.toml"
    config.write_text('model = "tiny"\n')
    env = {**os.environ, "EDGE_LLM_CONFIG": str(config)}
    cmd = [*CLI, "fetch-model", "--print-path"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).name == models.KNOWN_MODELS["tiny"].filename
    config.write_text(f'model = "{tmp_path / "mine.gguf"}"\n')
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "the configured model is a file, nothing to fetch" in result.stderr


def test_chat_ctrl_c_stops_the_answer_but_not_the_chat(server) -> None:
    """At a real terminal (a pty), Ctrl-C during an answer cancels it; the chat goes on."""
    import pty
    import select

    # setsid --ctty makes the pty the chat's controlling terminal, so Ctrl-C on it is SIGINT.
    # The chat hears it even when this test runs with SIGINT ignored (started with & by a
    # script: bash then ignores SIGINT in the background job, and its children inherit that).
    # (Not pty.fork(): forking this multi-threaded, gRPC-using process is unsafe.)
    # The answer is held after a few tokens until Ctrl-C has done its work, however fast or
    # slow this machine is: the interrupt lands mid-answer.
    hold = Hold(
        server.core.loaded.scheduler,
        lambda job: job.request.max_tokens == 1000 and job.stats.completion_tokens >= 3,
    )
    fd, tty = pty.openpty()
    proc = subprocess.Popen(
        [
            "setsid",
            "--wait",  # for the chat's exit status (setsid forks: Popen made a group leader)
            "--ctty",
            *CLI,
            "chat",
            "--address",
            f"127.0.0.1:{server.port}",
            "--max-tokens",
            "1000",
            "--temperature",
            "0",
        ],
        stdin=tty,
        stdout=tty,
        stderr=tty,
        start_new_session=True,
    )
    os.close(tty)
    out = b""

    def read_until(needle: bytes, count: int = 1, after: int = 0) -> None:
        """Read the terminal until `needle` appears `count` times after offset `after` (an
        empty needle: until anything does); a hang guard of minutes (shorter than pytest's,
        so a failure shows what was read), not a speed limit."""
        nonlocal out

        def seen() -> bool:
            return out[after:].count(needle) >= count if needle else len(out) > after

        deadline = time.monotonic() + 120
        while not seen():
            assert time.monotonic() < deadline, f"{needle!r} not seen in {out!r}"
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    out += os.read(fd, 4096)
                except OSError:  # the chat exited: say what it printed
                    raise AssertionError(f"{needle!r} not seen in {out!r}") from None

    try:
        read_until(b"> ")
        os.write(fd, b"Count from 1 to 1000, one number per line.\r")
        read_until(b"per line.\r\n")  # the terminal's echo of the question
        mark = out.index(b"per line.\r\n") + len(b"per line.\r\n")
        assert hold.reached.wait(300)
        read_until(b"", after=mark)  # the answer has begun on the screen
        os.write(fd, b"\x03")  # Ctrl-C
        read_until(b"[stopped: this turn is not kept]")
        hold.release()
        os.write(fd, b"Hi\r")
        read_until(b"> ", count=3)  # answered, and prompting again
        os.write(fd, b"\x04")  # Ctrl-D quits
        assert proc.wait(timeout=300) == 0
    finally:
        hold.release()
        proc.kill()
        proc.wait()
        os.close(fd)


def test_doctor_explains_this_machine(tiny_model: Path) -> None:
    result = run_cli("doctor", "--model", str(tiny_model), "--context-length", "100000", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["threads"]["generation"] >= 1 and report["threads"]["why"]
    assert report["memory"]["context_length"] == 8192  # the model's trained context
    assert any("does not fit" in w for w in report["warnings"])
    text = run_cli("doctor", "--model", str(tiny_model))
    assert text.returncode == 0 and "threads" in text.stdout and "plan" in text.stdout


def test_doctor_names_a_missing_model(tmp_path: Path) -> None:
    result = run_cli("doctor", "--model", str(tmp_path / "none.gguf"))
    assert result.returncode == 0
    assert "model file not found" in result.stdout
