"""The model cache: registry, idempotency and atomicity, without downloading anything.

The real fetch (PyPI download + GGUF conversion, ~45 s) is not run here; these tests swap in
fake sources that write a few files, which is all the cache logic sees.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from serve_app import model_store
from serve_app.model_store import KnownModel, Steps

REPO = Path(__file__).resolve().parents[1]


class FakeSource:
    """Writes a tiny "model" folder and counts builds; optionally fails half-way."""

    def __init__(self, fail: bool = False) -> None:
        self.builds = 0
        self.fail = fail

    def build(self, dest: Path, steps: Steps, dtype: str) -> None:
        self.builds += 1
        with steps.step("write"):
            (dest / "config.json").write_text('{"model_type": "fake"}')
            if self.fail:
                raise model_store.FetchError("boom")
            (dest / "model.safetensors").write_bytes(b"weights")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeSource:
    source = FakeSource()
    known = KnownModel("fake-model", "a test model", "1 KB", "float32", source)
    monkeypatch.setitem(model_store.KNOWN_MODELS, "fake-model", known)
    return source


def _complete(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / model_store.MARKER).write_text("{}")
    return folder


def test_unknown_name_lists_known_models(tmp_path: Path) -> None:
    with pytest.raises(model_store.UnknownModelError) as info:
        model_store.fetch_model("gpt-9", cache_dir=tmp_path)
    assert "gpt-9" in str(info.value) and "smollm2-135m" in str(info.value)
    assert isinstance(info.value, KeyError)  # `except KeyError` works too
    assert not any(tmp_path.iterdir())  # nothing created for a bad name


def test_smollm2_is_known_and_pinned() -> None:
    known = model_store.get_known("smollm2-135m")
    assert known.dtype == "float32"
    assert known.source.version and len(known.source.sha256) == 64  # type: ignore[attr-defined]
    assert (" Paris" in dict(known.checks).values()) and (" Rome" in dict(known.checks).values())


def test_complete_folder_returned_without_work(tmp_path: Path, fake: FakeSource) -> None:
    folder = _complete(tmp_path / "fake-model")
    assert model_store.fetch_model("fake-model", cache_dir=tmp_path, progress=False) == folder
    assert fake.builds == 0


def test_fast_path_imports_no_torch(tmp_path: Path) -> None:
    # Checked in a fresh interpreter: this test process may have imported torch already.
    _complete(tmp_path / "smollm2-135m")
    code = (
        "import sys\n"
        "from serve_app.model_store import fetch_model\n"
        "print(fetch_model('smollm2-135m'))\n"
        "heavy = [m for m in ('torch', 'transformers', 'rich') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, model_store.CACHE_ENV: str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == str(tmp_path / "smollm2-135m")


def test_fetch_builds_once_then_reuses(tmp_path: Path, fake: FakeSource) -> None:
    folder = model_store.fetch_model("fake-model", cache_dir=tmp_path, progress=False)
    assert folder == tmp_path / "fake-model"
    assert model_store.is_complete(folder)
    assert (folder / "model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake-model"]  # no temp folders left
    assert model_store.fetch_model("fake-model", cache_dir=tmp_path, progress=False) == folder
    assert fake.builds == 1


def test_fetched_folder_is_readable_by_others(tmp_path: Path, fake: FakeSource) -> None:
    folder = model_store.fetch_model("fake-model", cache_dir=tmp_path, progress=False)
    assert folder.stat().st_mode & 0o777 == 0o755
    assert (folder / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_force_rebuilds(tmp_path: Path, fake: FakeSource) -> None:
    model_store.fetch_model("fake-model", cache_dir=tmp_path, progress=False)
    folder = model_store.fetch_model("fake-model", cache_dir=tmp_path, progress=False, force=True)
    assert fake.builds == 2 and model_store.is_complete(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake-model"]


def test_failed_build_leaves_nothing(tmp_path: Path, fake: FakeSource) -> None:
    fake.fail = True
    with pytest.raises(model_store.FetchError, match="boom"):
        model_store.fetch_model("fake-model", cache_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the final folder nor the temp one
    fake.fail = False
    assert model_store.is_complete(model_store.fetch_model("fake-model", cache_dir=tmp_path))


def test_incomplete_folder_is_not_overwritten(tmp_path: Path, fake: FakeSource) -> None:
    (tmp_path / "fake-model").mkdir()
    (tmp_path / "fake-model" / "mine.txt").write_text("someone's files")
    with pytest.raises(model_store.FetchError, match="force"):
        model_store.fetch_model("fake-model", cache_dir=tmp_path, progress=False)
    assert (tmp_path / "fake-model" / "mine.txt").exists() and fake.builds == 0


def test_losing_a_race_to_another_fetch_is_fine(tmp_path: Path) -> None:
    final = _complete(tmp_path / "m")
    tmp = tmp_path / ".m.tmp-1"
    tmp.mkdir()
    (tmp / "x").write_text("x")
    model_store._install(tmp, final, force=False)  # the rename fails: final is already complete
    assert model_store.is_complete(final)


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(model_store.CACHE_ENV, str(tmp_path))
    assert model_store.default_cache_dir() == tmp_path
    monkeypatch.delenv(model_store.CACHE_ENV)
    assert model_store.default_cache_dir() == Path.home() / ".cache/raysight/models"


def test_cached_models_lists_complete_folders_only(tmp_path: Path) -> None:
    _complete(tmp_path / "a")
    (tmp_path / "b").mkdir()  # no marker
    (tmp_path / ".c.tmp-1").mkdir()
    assert model_store.cached_models(tmp_path) == {"a": tmp_path / "a"}
    assert model_store.cached_models(tmp_path / "missing") == {}


def test_answer_check_rejects_a_wrong_model(tiny_llama_path: Path) -> None:
    # The tiny random Llama answers nonsense: the check that guards a conversion must notice.
    with pytest.raises(model_store.FetchError, match="expected ' Paris'"):
        model_store._check_answers(
            tiny_llama_path, (("The Eiffel Tower is in the city of", " Paris"),)
        )
