from __future__ import annotations

import json
import os
import time
from pathlib import Path

import gguf
import pytest

from lmscli import paths
from lmscli.catalog import store
from lmscli.catalog.fuzzy import EXACT_MATCH_SCORE, fuzzy_filter
from lmscli.catalog.store import base_key, find_model, list_models, scan_models
from lmscli.errors import InvalidModelFileError
from tests.gguf_factory import TOOLS_TEMPLATE, make_gguf

SMOL_REL = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf"
Q4_1 = int(gguf.LlamaFileType.MOSTLY_Q4_1)
Q8_0 = int(gguf.LlamaFileType.MOSTLY_Q8_0)


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LMSCLI_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LMSCLI_MODELS_DIR", raising=False)
    return paths.models_dir()


def _make(models: Path, rel: str, **kwargs: object) -> Path:
    return make_gguf(models / rel, **kwargs)  # type: ignore[arg-type]


def test_empty_or_missing_store(models: Path) -> None:
    assert list_models() == []
    models.mkdir(parents=True)
    assert scan_models() == ([], [])


def test_local_model_fields(models: Path) -> None:
    _make(
        models,
        SMOL_REL,
        name="SmolLM2 135M Instruct",
        size_label="135M",
        context_length=8192,
        file_type=Q4_1,
    )
    [m] = list_models()
    assert m.model_key == "smollm2-135m-instruct"
    assert m.path == SMOL_REL
    assert m.abs_path == models / SMOL_REL
    assert (m.publisher, m.repo) == ("HuggingFaceTB", "SmolLM2-135M-Instruct-GGUF")
    assert m.file_name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert m.display_name == "SmolLM2 135M Instruct"
    assert m.size_bytes == (models / SMOL_REL).stat().st_size
    assert m.type == "llm"
    assert m.architecture == "llama"
    assert m.params_string == "135M"
    assert m.quantization == "Q4_1"
    assert m.bits == 4
    assert m.max_context_length == 8192
    assert m.trained_for_tool_use is False
    assert m.chat_template is not None


def test_fallbacks_for_name_params_and_bits(models: Path) -> None:
    _make(models, "me/repo/plain.gguf", name=None, n_params=2_000_000, file_type=None)
    [m] = list_models()
    assert m.display_name == "plain"
    assert m.params_string == "2M"
    assert m.quantization is None
    assert m.bits == round(m.size_bytes * 8 / 2_000_000, 2)  # measured bits per weight
    assert m.model_info()["quantization"] is None


def test_tools_and_embedding(models: Path) -> None:
    _make(models, "me/tools/tooly-Q8_0.gguf", chat_template=TOOLS_TEMPLATE, file_type=Q8_0)
    _make(models, "me/embed/nomic-embed-f16.gguf", arch="nomic-bert", chat_template=None)
    by_key = {m.model_key: m for m in list_models()}
    assert by_key["tooly"].trained_for_tool_use is True
    assert by_key["tooly"].bits == 8
    assert by_key["nomic-embed"].type == "embedding"
    assert by_key["nomic-embed"].model_info()["type"] == "embedding"


def test_model_info_dict(models: Path) -> None:
    _make(models, SMOL_REL, name="Smol", size_label="135M", context_length=8192, file_type=Q4_1)
    [m] = list_models()
    info = m.model_info()
    assert set(info) == {
        "type",
        "modelKey",
        "format",
        "displayName",
        "publisher",
        "path",
        "sizeBytes",
        "indexedModelIdentifier",
        "deviceIdentifier",
        "paramsString",
        "architecture",
        "quantization",
        "vision",
        "trainedForToolUse",
        "maxContextLength",
    }
    assert info["modelKey"] == "smollm2-135m-instruct"
    assert info["format"] == "gguf"
    assert info["path"] == info["indexedModelIdentifier"] == SMOL_REL
    assert info["deviceIdentifier"] is None
    assert info["quantization"] == {"name": "Q4_1", "bits": 4}
    assert info["vision"] is False
    assert info["maxContextLength"] == 8192
    json.dumps(info)


@pytest.mark.parametrize(
    ("file_name", "key"),
    [
        ("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
        ("gemma-3-270m-Q4_K_M.gguf", "gemma-3-270m"),
        ("qwen2.5-7b-instruct-q8_0.gguf", "qwen2.5-7b-instruct"),
        ("Model-IQ2_XS.gguf", "model"),
        ("model-f16.gguf", "model"),
        ("Model.BF16.gguf", "model"),
        ("model-F32.gguf", "model"),
        ("plain-model.gguf", "plain-model"),
        ("nomic-embed-text-v1.5.gguf", "nomic-embed-text-v1.5"),
    ],
)
def test_key_derivation(file_name: str, key: str) -> None:
    assert base_key(file_name) == key


def test_key_collision_uses_quantization(models: Path) -> None:
    _make(models, "a/r/tiny.Q4_1.gguf", file_type=Q4_1)
    _make(models, "b/r/tiny-Q8_0.gguf", file_type=Q8_0)
    _make(models, "c/r/other.gguf")
    assert [m.model_key for m in list_models()] == ["other", "tiny@q4_1", "tiny@q8_0"]


def test_key_collision_same_quantization_uses_path(models: Path) -> None:
    _make(models, "a/r/tiny.Q4_1.gguf", file_type=Q4_1)
    _make(models, "b/r/tiny.Q4_1.gguf", file_type=Q4_1)
    keys = [m.model_key for m in list_models()]
    assert keys == ["a/r/tiny.Q4_1.gguf", "b/r/tiny.Q4_1.gguf"]


def test_sorted_by_key(models: Path) -> None:
    for name in ["zeta", "Alpha", "mid"]:
        _make(models, f"p/{name}/{name}.gguf")
    assert [m.model_key for m in list_models()] == ["alpha", "mid", "zeta"]


def test_skips_and_reports_bad_files(models: Path) -> None:
    _make(models, "p/good/good.gguf")
    (models / "p/bad").mkdir(parents=True)
    (models / "p/bad/bad.gguf").write_bytes(b"not a gguf at all")
    (models / "p/good/partial.gguf.part").write_bytes(b"GGUF")
    _make(models, ".internal/hidden/hidden.gguf")
    _make(models, "p/.trash/old.gguf")
    _make(models, "toplevel.gguf")
    found, problems = scan_models()
    assert [m.model_key for m in found] == ["good"]
    assert len(problems) == 2
    assert any(p.startswith("p/bad/bad.gguf:") and "not a GGUF file" in p for p in problems)
    assert any(p.startswith("toplevel.gguf:") for p in problems)


def test_symlinked_files_count(models: Path, tmp_path: Path) -> None:
    real = make_gguf(tmp_path / "elsewhere" / "linked.Q4_1.gguf", file_type=Q4_1)
    (models / "me/linked").mkdir(parents=True)
    os.symlink(real, models / "me/linked/linked.Q4_1.gguf")
    [m] = list_models()
    assert m.model_key == "linked"
    assert m.size_bytes == real.stat().st_size


def test_broken_symlink_is_reported(models: Path, tmp_path: Path) -> None:
    (models / "me/gone").mkdir(parents=True)
    os.symlink(tmp_path / "missing.gguf", models / "me/gone/gone.gguf")
    found, problems = scan_models()
    assert found == [] and len(problems) == 1


def test_explicit_models_dir(tmp_path: Path, models: Path) -> None:
    other = tmp_path / "other-models"
    make_gguf(other / "x/y/elsewhere.gguf")
    assert [m.model_key for m in list_models(other)] == ["elsewhere"]
    assert list_models() == []


def test_find_model(models: Path) -> None:
    _make(models, SMOL_REL)
    _make(models, "google/gemma-3-270m-GGUF/gemma-3-270m-Q4_K_M.gguf", arch="gemma3")
    assert find_model("smollm2-135m-instruct").path == SMOL_REL  # type: ignore[union-attr]
    assert find_model("SmolLM2-135M-INSTRUCT").path == SMOL_REL  # type: ignore[union-attr]
    assert find_model(SMOL_REL.lower()).path == SMOL_REL  # type: ignore[union-attr]
    assert find_model(str(models / SMOL_REL)).path == SMOL_REL  # type: ignore[union-attr]
    assert find_model("gemma-3-270m").architecture == "gemma3"  # type: ignore[union-attr]
    assert find_model("smol") is None
    assert find_model("") is None
    assert find_model("/nowhere/x.gguf") is None
    assert find_model("~nobody\0x") is None  # a NUL is no path (the fuzz test's 500)


# --- metadata cache -------------------------------------------------------------------------


def _fail_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(path: object) -> None:
        raise AssertionError(f"header of {path} parsed despite the cache")

    monkeypatch.setattr(store, "read_gguf_metadata", boom)


def test_cache_makes_second_listing_fast(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(20):
        _make(models, f"pub{i}/repo{i}/model-{i}.Q4_1.gguf", file_type=Q4_1, n_params=4096)
    first = list_models()
    assert len(first) == 20
    assert paths.metadata_cache_file().is_file()
    _fail_reads(monkeypatch)
    start = time.perf_counter()
    second = list_models()
    elapsed = time.perf_counter() - start
    assert second == first
    assert elapsed < 0.1


def test_cache_is_invalidated_by_size_and_mtime(models: Path) -> None:
    path = _make(models, "p/r/m.gguf", name="Before")
    assert list_models()[0].display_name == "Before"
    make_gguf(path, name="After, and longer")
    assert list_models()[0].display_name == "After, and longer"
    # Same size, new content: only the mtime tells.
    make_gguf(path, name="After, and LONGER")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert list_models()[0].display_name == "After, and LONGER"


def test_unchanged_store_does_not_rewrite_cache(models: Path) -> None:
    _make(models, "p/r/m.gguf")
    list_models()
    cache = paths.metadata_cache_file()
    before = cache.stat().st_mtime_ns
    os.utime(cache, ns=(before - 10**9, before - 10**9))
    list_models()
    assert cache.stat().st_mtime_ns == before - 10**9


def test_cache_prunes_removed_models(models: Path) -> None:
    keep = _make(models, "p/keep/keep.gguf")
    gone = _make(models, "p/gone/gone.gguf")
    list_models()
    gone.unlink()
    assert [m.model_key for m in list_models()] == ["keep"]
    entries = json.loads(paths.metadata_cache_file().read_text())["entries"]
    assert list(entries) == [str(keep)]


@pytest.mark.parametrize("garbage", ["{not json", "[]", '{"version": 1, "entries": 5}', ""])
def test_corrupt_cache_is_ignored(models: Path, garbage: str) -> None:
    _make(models, "p/r/m.gguf", name="Fine")
    cache = paths.metadata_cache_file()
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(garbage)
    assert list_models()[0].display_name == "Fine"
    assert json.loads(cache.read_text())["version"] == 1
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]  # no temp files left


def test_bad_cache_entry_is_reparsed(models: Path) -> None:
    path = _make(models, "p/r/m.gguf", name="Fine")
    list_models()
    cache = paths.metadata_cache_file()
    data = json.loads(cache.read_text())
    data["entries"][str(path)]["meta"] = {"unexpected": True}
    cache.write_text(json.dumps(data))
    assert list_models()[0].display_name == "Fine"


def test_file_that_becomes_corrupt_is_dropped(models: Path) -> None:
    path = _make(models, "p/r/m.gguf")
    assert len(list_models()) == 1
    path.write_bytes(b"garbage!")
    found, problems = scan_models()
    assert found == [] and problems and "m.gguf" in problems[0]
    with pytest.raises(InvalidModelFileError):
        store.read_gguf_metadata(path)


# --- fuzzy ----------------------------------------------------------------------------------


def test_fuzzy_prefix_scores() -> None:
    result = fuzzy_filter("smol", ["smollm2-135m-instruct", "gemma-3-270m"])
    assert result == [("smollm2-135m-instruct", 1 + 3 + 7 + 15)]


def test_fuzzy_consecutive_beats_scattered() -> None:
    items = ["g-e-m-m-a", "gemma-3-270m", "my-gem"]
    result = fuzzy_filter("gem", items)
    assert [item for item, _ in result] == ["gemma-3-270m", "my-gem", "g-e-m-m-a"]
    assert dict(result) == {"gemma-3-270m": 11, "my-gem": 11, "g-e-m-m-a": 3}


def test_fuzzy_ties_keep_input_order() -> None:
    assert fuzzy_filter("a", ["ba", "ca", "xa"]) == [("ba", 1), ("ca", 1), ("xa", 1)]


def test_fuzzy_is_case_insensitive_and_exact_wins() -> None:
    result = fuzzy_filter("GEMMA", ["gemma-3-270m", "Gemma"])
    assert result[0] == ("Gemma", EXACT_MATCH_SCORE)
    assert result[1] == ("gemma-3-270m", 1 + 3 + 7 + 15 + 31)


def test_fuzzy_non_matches_are_dropped() -> None:
    assert fuzzy_filter("qwen", ["smollm2-135m-instruct", "gemma-3-270m"]) == []
    assert fuzzy_filter("mms", ["smollm"]) == []


def test_fuzzy_empty_pattern_matches_all_in_order() -> None:
    items = ["b", "a", "c"]
    assert fuzzy_filter("", items) == [("b", 0), ("a", 0), ("c", 0)]
    assert fuzzy_filter("x", []) == []
