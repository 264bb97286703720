from pathlib import Path

import pytest

from edge_llm.config import Config, ConfigError, load_config


def test_flags_beat_environment_beat_file_beat_defaults(tmp_path: Path) -> None:
    f = tmp_path / "config.toml"
    f.write_text('port = 7000\nqueue_depth = 3\nmodel = "/m.gguf"\nthreads = 1\n')
    env = {"EDGE_LLM_PORT": "8000", "EDGE_LLM_QUEUE_DEPTH": "5"}
    config = load_config({"port": 9000, "host": None}, env=env, config_file=f)
    assert config.port == 9000  # flag
    assert config.queue_depth == 5  # environment
    assert config.model == "/m.gguf" and config.threads == 1  # file
    assert config.host == Config().host  # default


def test_config_file_from_environment(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("context_length = 2048\n")
    assert load_config(env={"EDGE_LLM_CONFIG": str(f)}).context_length == 2048


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prot = 1\n", "unknown setting(s)"),
        ('port = "x"\n', "port in"),
        ("port = 70000\n", "port must be in"),
        ("queue_depth = 0\n", "queue_depth must be > 0"),
        ("max_tokens = 10\ndefault_max_tokens = 20\n", "default_max_tokens"),
        ("parallel = 300\n", "parallel (300) must be at most batch_size (256)"),
        ("parallel = -1\n", "parallel must be >= 0"),
        ("port = [\n", "not valid TOML"),
    ],
)
def test_bad_settings_are_named(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(env={}, config_file=f)


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="EDGE_LLM_THREADS"):
        load_config(env={"EDGE_LLM_THREADS": "many"})


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(env={}, config_file=Path("/nonexistent/edge.toml"))


def test_booleans_from_file_environment_and_flags(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("log_prompts = true\ndrain_seconds = 5\n")
    assert load_config(env={}, config_file=f).log_prompts is True
    assert load_config(env={"EDGE_LLM_LOG_PROMPTS": "no"}, config_file=f).log_prompts is False
    assert load_config({"log_prompts": True}, env={}).log_prompts is True
    with pytest.raises(ConfigError, match="EDGE_LLM_LOG_PROMPTS must be true or false"):
        load_config(env={"EDGE_LLM_LOG_PROMPTS": "sometimes"})
    with pytest.raises(ConfigError, match="drain_seconds must be >= 0"):
        load_config(env={"EDGE_LLM_DRAIN_SECONDS": "-1"})


def test_an_unwritable_state_directory_is_named_in_one_line(tiny_model) -> None:
    """As in a container with a read-only root and no home: exit 2 before the port opens,
    with the directory and the setting that moves it."""
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "edge_llm", "serve", "--model", str(tiny_model), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "EDGE_LLM_STATE_DIR": "/proc/edge-llm"},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "edge-llm: cannot keep sessions in /proc/edge-llm (No such file or directory): set "
        "state_dir in the config file, or EDGE_LLM_STATE_DIR, to a writable directory"
    ]
