from __future__ import annotations

import os
from pathlib import Path

import pytest

from lmscli import paths
from lmscli.catalog.importer import default_user_repo, import_model
from lmscli.catalog.store import find_model, list_models
from lmscli.errors import InvalidModelFileError, UserInputError
from tests.gguf_factory import make_gguf

FILE = "SmolTest-135M.Q4_1.gguf"


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LMSCLI_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LMSCLI_MODELS_DIR", raising=False)
    monkeypatch.setenv("USER", "alice")
    return paths.models_dir()


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return make_gguf(tmp_path / "downloads" / FILE, file_type=3)


def test_move_is_the_default(models: Path, src: Path) -> None:
    data = src.read_bytes()
    result = import_model(src)
    expected = models / "alice" / "SmolTest-135M" / FILE
    assert result.target == expected
    assert (result.mode, result.dry_run) == ("move", False)
    assert not src.exists()
    assert expected.read_bytes() == data
    assert find_model("smoltest-135m") is not None


def test_copy(models: Path, src: Path) -> None:
    result = import_model(src, mode="copy", user_repo="me/my-models")
    assert result.target == models / "me/my-models" / FILE
    assert src.exists()
    assert result.target.read_bytes() == src.read_bytes()
    assert not result.target.is_symlink()
    assert [p.name for p in result.target.parent.iterdir()] == [FILE]  # no temp file left


def test_symlink_points_to_absolute_source(
    models: Path, src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(src.parent)
    result = import_model(Path(FILE), mode="symlink")
    assert result.target.is_symlink()
    assert os.readlink(result.target) == str(src)
    [m] = list_models()
    assert m.model_key == "smoltest-135m"
    assert m.abs_path == result.target


def test_hardlink(models: Path, src: Path) -> None:
    result = import_model(src, mode="hardlink")
    assert src.exists()
    assert os.path.samefile(src, result.target)


def test_dry_run_changes_nothing(models: Path, src: Path) -> None:
    result = import_model(src, dry_run=True)
    assert result.dry_run is True
    assert result.target == models / "alice" / "SmolTest-135M" / FILE
    assert src.exists()
    assert not models.exists()


def test_existing_target(models: Path, src: Path, tmp_path: Path) -> None:
    import_model(src, mode="copy")
    with pytest.raises(UserInputError) as info:
        import_model(src, mode="copy")
    assert info.value.message.startswith("Target file already exists: ")
    assert str(models / "alice") in info.value.message
    with pytest.raises(UserInputError):
        import_model(src, mode="copy", dry_run=True)


def test_not_a_gguf_file(models: Path, tmp_path: Path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(InvalidModelFileError) as info:
        import_model(bad)
    assert info.value.message == "notes.txt is not a GGUF model file: bad magic bytes"
    assert bad.exists()


def test_truncated_gguf_is_rejected(models: Path, src: Path) -> None:
    src.write_bytes(src.read_bytes()[:40])
    with pytest.raises(InvalidModelFileError, match="is not a GGUF model file: truncated"):
        import_model(src)


def test_missing_source_and_directory(models: Path, tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="File not found"):
        import_model(tmp_path / "nope.gguf")
    with pytest.raises(UserInputError, match="Not a file"):
        import_model(tmp_path)


@pytest.mark.parametrize("user_repo", ["noslash", "a/b/c", "../x", "a/..", "/abs", "a/", ""])
def test_bad_user_repo(models: Path, src: Path, user_repo: str) -> None:
    with pytest.raises(UserInputError, match="user/repo"):
        import_model(src, user_repo=user_repo)
    assert src.exists()


def test_bad_mode(models: Path, src: Path) -> None:
    with pytest.raises(UserInputError):
        import_model(src, mode="teleport")  # type: ignore[arg-type]


def test_default_user_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USER", "bob")
    assert default_user_repo(Path("/x/gemma-3-270m-Q4_K_M.gguf")) == "bob/gemma-3-270m"
    assert default_user_repo(Path("plain.gguf")) == "bob/plain"
    monkeypatch.delenv("USER")
    assert default_user_repo(Path("Model.F16.gguf")) == "local/Model"
    monkeypatch.setenv("USER", "DOMAIN\\weird user")
    assert default_user_repo(Path("m.gguf")) == "DOMAIN-weird-user/m"


def test_explicit_models_dir(models: Path, tmp_path: Path, src: Path) -> None:
    other = tmp_path / "elsewhere"
    result = import_model(src, mode="copy", user_repo="u/r", models_dir=other)
    assert result.target == other / "u/r" / FILE
    assert [m.model_key for m in list_models(other)] == ["smoltest-135m"]
