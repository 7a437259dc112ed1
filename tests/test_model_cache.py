"""The embedded model's cache: converted once into $FEDSE_CACHE, and safe when several processes
convert it at the same moment (the nodes of `fedse flower local` on a fresh machine)."""

import json
from pathlib import Path

import pytest

from fedse.agent import model

NAME = next(iter(model.EMBEDDED))


class FakePretrained:
    """What the conversion loads from the GGUF: something that saves a folder. `before_save` runs
    first, as another process would between this one's load and its rename."""

    config = object()

    def __init__(self, before_save=None) -> None:
        self.before_save = before_save

    def save_pretrained(self, folder) -> None:
        if self.before_save:
            self.before_save()
        (Path(folder) / "config.json").write_text(json.dumps({"saved_by": "this process"}))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSE_CACHE", str(tmp_path))
    monkeypatch.setattr(model, "embedded_gguf", lambda name: tmp_path / "model.gguf")
    monkeypatch.setattr(model.AutoTokenizer, "from_pretrained", lambda *a, **k: FakePretrained())
    return tmp_path


def loads(monkeypatch, fake: FakePretrained) -> None:
    monkeypatch.setattr(model.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: fake)


def test_the_first_conversion_fills_the_cache_and_leaves_no_temporary_folder(cache, monkeypatch):
    loads(monkeypatch, FakePretrained())
    assert model.resolve(NAME) == str(cache / NAME)
    assert json.loads((cache / NAME / "config.json").read_text()) == {"saved_by": "this process"}
    assert sorted(p.name for p in cache.iterdir()) == [NAME]


def test_a_process_that_loses_the_race_to_convert_uses_the_winners_folder(cache, monkeypatch):
    def another_process_finishes_first():
        (cache / NAME).mkdir()
        (cache / NAME / "weights.safetensors").write_text("theirs")
        (cache / NAME / "config.json").write_text(json.dumps({"saved_by": "another process"}))

    loads(monkeypatch, FakePretrained(before_save=another_process_finishes_first))
    assert model.resolve(NAME) == str(cache / NAME)
    assert json.loads((cache / NAME / "config.json").read_text()) == {"saved_by": "another process"}
    assert sorted(p.name for p in cache.iterdir()) == [NAME]  # this process's copy is gone


def test_a_conversion_that_fails_with_nothing_converted_raises_and_leaves_nothing(cache, monkeypatch):
    def disk_full():
        raise OSError(28, "No space left on device")

    loads(monkeypatch, FakePretrained(before_save=disk_full))
    with pytest.raises(OSError, match="No space left"):
        model.resolve(NAME)
    assert list(cache.iterdir()) == []
