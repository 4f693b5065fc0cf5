"""The `raysight` CLI through typer's CliRunner: keys, and the models commands' plumbing."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from serve_app import model_store
from serve_app.cli import app
from serve_app.config import ApiKey, hash_key

runner = CliRunner()


def _new_key(*args: str) -> tuple[str, dict]:
    result = runner.invoke(app, ["keys", "new", *args])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    key = next(line for line in lines if line.startswith("rs-"))
    snippet = "\n".join(lines[lines.index(next(ln for ln in lines if ln.startswith("- user:"))) :])
    (entry,) = yaml.safe_load(snippet)
    return key, entry


def test_keys_new_prints_key_and_matching_config_entry() -> None:
    key, entry = _new_key("--user", "alice")
    assert entry == {"user": "alice", "key_sha256": hash_key(key)}
    ApiKey.model_validate(entry)  # pastes straight into auth.api_keys
    assert len(key) > 40


def test_keys_new_is_random_and_defaults_the_user() -> None:
    (k1, e1), (k2, _) = _new_key(), _new_key()
    assert k1 != k2
    assert e1["user"]


def test_keys_hash() -> None:
    result = runner.invoke(app, ["keys", "hash", "s3cret"])
    assert result.exit_code == 0
    assert result.stdout.strip() == hash_key("s3cret")


def test_keys_hash_from_stdin() -> None:
    result = runner.invoke(app, ["keys", "hash", "-"], input="s3cret\n")
    assert result.exit_code == 0
    assert result.stdout.strip() == hash_key("s3cret")


def test_models_fetch_unknown_name() -> None:
    result = runner.invoke(app, ["models", "fetch", "gpt-9"])
    assert result.exit_code == 2
    assert "smollm2-135m" in result.stderr and result.stdout == ""


def test_models_fetch_prints_only_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "smollm2-135m"
    folder.mkdir()
    (folder / model_store.MARKER).write_text("{}")  # already complete: no download
    result = runner.invoke(app, ["models", "fetch", "smollm2-135m", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(folder)


def test_models_list(tmp_path: Path) -> None:
    result = runner.invoke(app, ["models", "list", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0
    assert "smollm2-135m" in result.stdout and "not fetched" in result.stdout


# --- serve: refused before anything starts (the real processes are in test_serve_cli.py) ----------


def test_serve_needs_a_model() -> None:
    result = runner.invoke(app, ["serve"])
    assert result.exit_code == 2
    assert result.stderr == "error: give --config FILE or at least one --model NAME=PATH\n"


def test_serve_model_flag_takes_name_and_path() -> None:
    result = runner.invoke(app, ["serve", "--model", "just-a-path", "--api-key", "k"])
    assert result.exit_code == 2
    assert result.stderr == "error: --model takes NAME=PATH, got 'just-a-path'\n"


def test_serve_errors_are_one_unwrapped_line_per_model(tmp_path: Path) -> None:
    deep = tmp_path / ("a-rather-long-folder-name-" * 6) / "model"  # longer than any terminal
    result = runner.invoke(app, ["serve", "--model", f"one={deep}", "--model", f"two={deep}2", "--api-key", "k"])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: model 'one': path {deep} does not exist",
        f"error: model 'two': path {deep}2 does not exist",
    ]
    assert result.stdout == ""
