"""What ships for operators: the systemd unit, the sysusers entry, the config sample and the
k3s manifest are checked with the real tools (systemd-analyze, systemd-sysusers, the
Kubernetes API schemas)."""

from __future__ import annotations

import pwd
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from edge_llm.config import Config

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "edge-llm.service"
MAX_EXPOSURE = 2.0


def systemd_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: scripts/bootstrap installs Debian's systemd package")
    return path


@pytest.fixture
def unit_here(tmp_path: Path) -> Path:
    """The unit as installed, but running this checkout's edge-llm: verify checks that
    ExecStart= exists, and /opt/edge-llm is not installed on a test machine."""
    edge_llm = Path(sys.executable).parent / "edge-llm"
    text = UNIT.read_text().replace("/opt/edge-llm/bin/edge-llm", str(edge_llm))
    path = tmp_path / "edge-llm.service"
    path.write_text(text)
    return path


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_verifies_without_warnings(unit_here: Path) -> None:
    result = subprocess.run(
        [systemd_tool("systemd-analyze"), "verify", str(unit_here)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    # Unknown or misspelled keys are only warnings: any output at all fails the test.
    assert result.stdout + result.stderr == ""


def test_unit_exposure_is_at_most_2(unit_here: Path) -> None:
    result = subprocess.run(
        [
            systemd_tool("systemd-analyze"),
            "security",
            "--offline=true",
            "--no-pager",
            str(unit_here),
        ],
        capture_output=True,
        text=True,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_unit_settings_match_the_service() -> None:
    s = unit_settings()
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["MemoryMax"] == ["2G"] and s["MemorySwapMax"] == ["0"]
    assert s["ExecStart"] == ["/opt/edge-llm/bin/edge-llm serve"]
    assert s["Restart"] == ["on-failure"]
    # The stop timeout must cover the drain, or systemd kills answers the drain would finish.
    assert int(s["TimeoutStopSec"][0].removesuffix("s")) >= Config().drain_seconds + 10
    # The service plans memory for the smaller of 2 GiB and its cgroup limit.
    assert s["User"] == ["edge-llm"]
    assert "edge-llm" in s["CacheDirectory"] and "edge-llm" in s["StateDirectory"]


def test_sysusers_entry_creates_the_user() -> None:
    conf = ROOT / "systemd" / "edge-llm.sysusers.conf"
    result = subprocess.run(
        [systemd_tool("systemd-sysusers"), "--dry-run", str(conf)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    created = "Creating user 'edge-llm'" in result.stdout + result.stderr
    assert created or "edge-llm" in {u.pw_name for u in pwd.getpwall()}


def test_config_sample_lists_every_setting_with_its_default() -> None:
    sample = (ROOT / "packaging" / "config.toml").read_text()
    settings = "\n".join(
        line.removeprefix("# ") for line in sample.splitlines() if re.match(r"# \w+ = ", line)
    )
    values = tomllib.loads(settings)
    defaults = Config()
    assert set(values) == set(Config.__dataclass_fields__)
    for name, value in values.items():
        assert value == getattr(defaults, name), name


def manifest() -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((ROOT / "packaging" / "k3s" / "edge-llm.yaml").read_text()))


def test_k3s_manifest_is_valid_kubernetes() -> None:
    version = kubernetes_validate.utils.latest_version()
    for doc in manifest():
        kubernetes_validate.validate(doc, version, strict=True)


def test_k3s_manifest_probes_and_limits() -> None:
    daemonset, service = manifest()
    pod = daemonset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    port = container["ports"][0]["containerPort"]
    assert port == Config().port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port, probe
    assert container["readinessProbe"]["grpc"]["service"] == "edge_llm.v1.EdgeLLM"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # the model load
    assert container["resources"]["limits"]["memory"] == "2Gi"
    env = {e["name"]: e["value"] for e in container["env"]}
    drain = int(env.get("EDGE_LLM_DRAIN_SECONDS", image_env()["EDGE_LLM_DRAIN_SECONDS"]))
    assert pod["terminationGracePeriodSeconds"] >= drain + 10
    assert service["spec"]["clusterIP"] == "None"  # headless: clients balance per call
    # A read-only root: sessions and verdicts go to volumes where the image says they live.
    assert container["securityContext"]["readOnlyRootFilesystem"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    for name in ("EDGE_LLM_STATE_DIR", "XDG_CACHE_HOME"):
        assert any(Path(image_env()[name]).is_relative_to(m) for m in mounts), name


def image_env() -> dict[str, str]:
    """The Containerfile's ENV settings (NAME=value pairs)."""
    image = (ROOT / "packaging" / "Containerfile").read_text().replace("\\\n", " ")
    lines = [line.split(None, 1)[1] for line in image.splitlines() if line.startswith("ENV ")]
    return dict(pair.split("=", 1) for line in lines for pair in line.split())


def test_the_image_drains_within_docker_stops_timeout() -> None:
    """`docker stop` and `podman stop` send SIGKILL 10 s after SIGTERM: the image's drain must
    end before that, or a stop with an answer in flight exits 137 (scripts/test-image proves
    it with a real stop)."""
    assert int(image_env()["EDGE_LLM_DRAIN_SECONDS"]) <= 10 - 2


def test_an_installed_copy_carries_the_chat_page(tmp_path: Path) -> None:
    """packaging/install and the image install a copy of edge-llm, not the checkout: the page's
    files must be in its wheel (an installed copy without them failed to start)."""
    import zipfile

    source = tmp_path / "src"  # a copy: setuptools leaves a build/ directory behind
    shutil.copytree(
        ROOT, source, ignore=shutil.ignore_patterns(".*", "tests", "build", "dist", "*.egg-info")
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(source)],
        check=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("edge_llm-*.whl")
    packed = set(zipfile.ZipFile(wheel).namelist())
    page = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "edge_llm" / "web").rglob("*")
        if p.is_file()
    }
    assert page and page <= packed, sorted(page - packed)
