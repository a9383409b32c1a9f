"""The prompt cache beyond the slots: its tiers and bounds, and the scheduler saving and
restoring sequences through it (fake engine: its "KV" is the tokens each sequence holds)."""

from __future__ import annotations

import logging
import queue
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmscli.engine import Done, LoadOptions, ModelSpec, PredictionRequest, SamplingParams
from lmscli.engine.base import MIN_SAVE, ModelInstance
from lmscli.engine.fake import FakeBackend, FakeEngine
from lmscli.engine.promptcache import MAGIC, PromptCache, parse_size
from tests.gguf_factory import make_gguf

KEY = "fake 1.0 | m.gguf | ctx=4096 seq=1 kv=f16"


def toks(*ranges: range) -> list[int]:
    return [t for r in ranges for t in r]


# -- the cache on its own --------------------------------------------------------------------

def test_lookup_finds_the_longest_prefix_under_its_own_key() -> None:
    cache = PromptCache(2**20)
    cache.save(KEY, toks(range(100)), b"a" * 10)
    cache.save(KEY, toks(range(50), range(1000, 1100)), b"b" * 10)
    hit = cache.lookup(KEY, toks(range(80), range(5000, 5010)))
    assert hit is not None and hit.prefix == 80 and cache.load(hit) == b"a" * 10
    hit = cache.lookup(KEY, toks(range(50), range(1000, 1020)))
    assert hit is not None and hit.prefix == 70 and cache.load(hit) == b"b" * 10
    assert cache.lookup("another model", toks(range(100))) is None
    assert cache.lookup(KEY, toks(range(7000, 7100))) is None


def test_a_longer_state_replaces_the_one_it_extends() -> None:
    cache = PromptCache(2**20)
    cache.save(KEY, toks(range(100)), b"short")
    assert cache.covers(KEY, toks(range(60)))
    assert not cache.covers(KEY, toks(range(120)))
    cache.save(KEY, toks(range(120)), b"longer")
    assert cache.stats()["entries"] == 1
    hit = cache.lookup(KEY, toks(range(100)))
    assert hit is not None and cache.load(hit) == b"longer"


def test_ram_is_bounded_in_bytes_least_recently_used_first() -> None:
    cache = PromptCache(250)
    for i in range(3):
        cache.save(KEY, toks(range(i * 1000, i * 1000 + 10)), bytes(100))
    assert cache.stats()["ramBytes"] == 200
    assert cache.lookup(KEY, toks(range(10))) is None  # the oldest went
    first = cache.lookup(KEY, toks(range(1000, 1010)))
    assert first is not None and cache.load(first)  # now the most recent
    cache.save(KEY, toks(range(5000, 5010)), bytes(100))
    assert cache.lookup(KEY, toks(range(1000, 1010))) is not None
    assert cache.lookup(KEY, toks(range(2000, 2010))) is None
    cache.save(KEY, toks(range(9000, 9010)), bytes(1000))  # larger than the bound: not kept
    assert cache.lookup(KEY, toks(range(9000, 9010))) is None
    assert cache.stats()["ramBytes"] <= 250


def test_saved_states_yield_their_memory_to_a_model_that_needs_it() -> None:
    cache = PromptCache(1000)
    for i in range(4):
        cache.save(KEY, toks(range(i * 1000, i * 1000 + 10)), bytes(200))
    assert cache.release(300) == 400  # whole entries, the oldest first
    assert cache.stats()["ramBytes"] == 400 and cache.ram_limit == 1000
    assert cache.lookup(KEY, toks(range(3000, 3010))) is not None


def test_the_disk_keeps_states_for_the_next_server(tmp_path: Path) -> None:
    cache = PromptCache(2**20, tmp_path, 2**20)
    data = bytes(range(256)) * 40
    cache.save(KEY, toks(range(300)), data)
    assert cache.written(5)
    assert not list(tmp_path.glob("*.lmskv"))  # written when it leaves RAM, or on persist
    cache.persist(KEY)
    assert cache.written(5) and len(list(tmp_path.glob("*.lmskv"))) == 1
    again = PromptCache(2**20, tmp_path, 2**20)
    hit = again.lookup(KEY, toks(range(200), range(900, 950)))
    assert hit is not None and hit.prefix == 200 and again.load(hit) == data
    assert again.stats()["diskBytes"] == len(data)
    assert again.lookup("another model", toks(range(300))) is None


def test_a_state_that_leaves_ram_goes_to_the_disk(tmp_path: Path) -> None:
    cache = PromptCache(250, tmp_path, 2**20)
    for i in range(3):
        cache.save(KEY, toks(range(i * 1000, i * 1000 + 10)), bytes([i]) * 100)
    assert cache.written(5)
    assert len(list(tmp_path.glob("*.lmskv"))) == 1  # the oldest, pushed out of RAM
    hit = cache.lookup(KEY, toks(range(10)))
    assert hit is not None and cache.load(hit) == bytes([0]) * 100
    assert cache.stats()["entries"] == 3


def test_a_state_waiting_for_the_disk_is_still_read_from_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = PromptCache(250, tmp_path, 2**20)
    disk_free = threading.Event()
    write = cache._write_file

    def slow_write(entry: Any, data: Any) -> Path:
        disk_free.wait(5)
        return write(entry, data)

    monkeypatch.setattr(cache, "_write_file", slow_write)
    for i in range(3):
        cache.save(KEY, toks(range(i * 1000, i * 1000 + 10)), bytes([i]) * 100)
    hit = cache.lookup(KEY, toks(range(10)))  # out of RAM, not yet on disk
    assert hit is not None and cache.load(hit) == bytes([0]) * 100
    disk_free.set()
    assert cache.written(5) and len(list(tmp_path.glob("*.lmskv"))) == 1
    assert cache.stats()["entries"] == 3


def test_memory_given_to_a_model_is_not_held_by_disk_writes(tmp_path: Path) -> None:
    cache = PromptCache(1000, tmp_path, 2**20)
    cache.save(KEY, toks(range(10)), bytes(400))
    assert cache.release(400) == 400
    assert cache.written(5) and not list(tmp_path.glob("*.lmskv"))


def test_the_disk_is_bounded_too(tmp_path: Path) -> None:
    cache = PromptCache(0, tmp_path, 250)
    for i in range(4):
        cache.save(KEY, toks(range(i * 1000, i * 1000 + 10)), bytes([i]) * 100)
    assert cache.written(5)
    assert len(list(tmp_path.glob("*.lmskv"))) == 2
    hit = cache.lookup(KEY, toks(range(3000, 3010)))
    assert hit is not None and cache.load(hit) == bytes([3]) * 100  # RAM off: read back
    assert cache.lookup(KEY, toks(range(10))) is None


def test_damaged_cache_files_are_skipped_with_a_log_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = PromptCache(0, tmp_path, 2**20)
    cache.save(KEY, toks(range(100)), b"x" * 500)
    cache.save(KEY, toks(range(500, 600)), b"y" * 500)
    assert cache.written(5)
    damaged, truncated = sorted(tmp_path.glob("*.lmskv"))
    raw = bytearray(damaged.read_bytes())
    raw[-10] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    (tmp_path / "stray.lmskv").write_bytes(b"not a cache file at all")
    huge = MAGIC + struct.pack("<I", 40) + b'{"key":"k","tokens":1e15,"bytes":1,"crc32":1}'
    (tmp_path / "huge.lmskv").write_bytes(huge)
    (tmp_path / "left-by-a-kill.tmp").write_bytes(b"half a state")
    with caplog.at_level(logging.WARNING, "lmscli.promptcache"):
        again = PromptCache(0, tmp_path, 2**20)
        # the truncated, stray and huge files are skipped; the half-written one removed
        assert again.stats()["entries"] == 1
        assert not list(tmp_path.glob("*.tmp"))
        hit = again.lookup(KEY, toks(range(500, 600))) or again.lookup(KEY, toks(range(100)))
        assert hit is not None and again.load(hit) is None  # the damaged one: read, refused
    assert again.stats()["entries"] == 0
    text = caplog.text
    assert "truncated" in text and "not an lmscli prompt cache file" in text
    assert "damaged" in text


def test_sizes_read_like_a_user_writes_them() -> None:
    assert parse_size("0") == 0
    assert parse_size("512M") == 512 * 2**20
    assert parse_size("2g") == parse_size("2GiB") == parse_size("2GB") == 2 * 2**30
    assert parse_size("1.5K") == 1536
    for bad in ("lots", "-1G", ""):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


# -- the scheduler with it -------------------------------------------------------------------

@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "m.gguf"
    make_gguf(path, name="Tiny", context_length=4096)
    return path


def load(model_file: Path, cache: PromptCache | None, **options: int) -> ModelInstance:
    engine = FakeEngine()
    engine.prompt_cache = cache
    spec = ModelSpec(path=str(model_file), model_key="tiny", max_context_length=4096)
    inst = engine.load(spec, LoadOptions(**options))
    assert isinstance(inst.backend, FakeBackend)
    return inst


@pytest.fixture
def one_slot(model_file: Path) -> Iterator[ModelInstance]:
    inst = load(model_file, PromptCache(2**24), parallel=1)
    yield inst
    inst.close()


def ask(inst: ModelInstance, prompt: str) -> Done:
    events: queue.Queue = queue.Queue()
    inst.submit(PredictionRequest(prompt, SamplingParams(max_tokens=8)), events.put)
    while True:
        event = events.get(timeout=10)
        if event.type in ("done", "failed"):
            assert isinstance(event, Done), event
            return event


def conversation(name: str, words: int = 200) -> str:
    return " ".join(f"{name}{i}" for i in range(words)) + " [[reply: ok]] "


def assert_kv_matches_slots(inst: ModelInstance) -> None:
    for slot in inst.slots:
        assert inst.backend.kv.get(slot.id, []) == slot.tokens


def test_more_conversations_than_slots_restore_instead_of_decoding(
        one_slot: ModelInstance) -> None:
    prompts = [conversation(name) for name in ("a", "b", "c")]
    for prompt in prompts:
        assert ask(one_slot, prompt).stats.cached_tokens == 0
    decoded, restored = one_slot.backend.decoded_tokens, 0
    for prompt in prompts:  # each lost the slot to the next: all three come back from RAM
        stats = ask(one_slot, prompt).stats
        assert stats.cached_tokens == stats.prompt_tokens - 1
        restored += stats.cached_tokens
        assert_kv_matches_slots(one_slot)
    assert one_slot.backend.decoded_tokens - decoded < 3 * 10  # one prompt token and the answers
    counts = one_slot.cache.stats(one_slot.cache_key) if one_slot.cache else {}
    assert counts["hits"] == 3 and counts["misses"] == 3
    assert counts["restoredTokens"] == restored


def test_without_the_cache_each_turn_decodes_its_whole_prompt(model_file: Path) -> None:
    inst = load(model_file, None, parallel=1)
    try:
        prompts = [conversation(name) for name in ("a", "b")]
        for prompt in prompts + prompts:
            assert ask(inst, prompt).stats.cached_tokens == 0
    finally:
        inst.close()


def test_a_next_turn_restores_the_answer_too(one_slot: ModelInstance) -> None:
    first = conversation("a")
    ask(one_slot, first)
    ask(one_slot, conversation("b"))
    # what the slot held, its prompt and answer, comes back whole (a next turn's beginning)
    stats = ask(one_slot, first + "ok").stats
    assert stats.prompt_tokens == len(one_slot.tokenize(first)) + 1
    assert stats.cached_tokens == stats.prompt_tokens - 1
    assert_kv_matches_slots(one_slot)


def test_short_prompts_are_not_worth_saving(one_slot: ModelInstance) -> None:
    short = conversation("a", words=MIN_SAVE // 4)
    ask(one_slot, short)
    ask(one_slot, conversation("b"))
    assert one_slot.cache is not None
    assert one_slot.cache.lookup(one_slot.cache_key, one_slot.tokenize(short)) is None
    assert ask(one_slot, short).stats.cached_tokens == 0


def wait_saved(inst: ModelInstance, prompt: str) -> None:
    assert inst.cache is not None
    deadline = time.monotonic() + 5
    while not inst.cache.lookup(inst.cache_key, inst.tokenize(prompt)):
        assert time.monotonic() < deadline, "never saved"
        time.sleep(0.01)


def test_an_idle_engine_saves_its_slots_before_they_are_needed(
        one_slot: ModelInstance) -> None:
    a, b = conversation("a"), conversation("b")
    ask(one_slot, a)
    wait_saved(one_slot, a)
    assert one_slot.cache is not None
    saves = one_slot.cache.stats()["saves"]
    ask(one_slot, b)  # evicts a: already saved, not copied again
    wait_saved(one_slot, b)
    assert one_slot.cache.stats()["saves"] == saves + 1  # b's own, saved while idle


def test_a_state_the_engine_refuses_is_dropped_and_the_prompt_decoded(
        one_slot: ModelInstance, caplog: pytest.LogCaptureFixture) -> None:
    a = conversation("a")
    ask(one_slot, a)
    ask(one_slot, conversation("b"))
    cache = one_slot.cache
    assert cache is not None
    hit = cache.lookup(one_slot.cache_key, one_slot.tokenize(a))
    assert hit is not None
    hit.entry.data = b"garbage"
    with caplog.at_level(logging.WARNING, "lmscli.engine"):
        stats = ask(one_slot, a).stats
    assert stats.cached_tokens == 0 and stats.stop_reason == "eosFound"
    assert "refused a saved prompt state" in caplog.text
    assert_kv_matches_slots(one_slot)


def test_an_unloaded_model_leaves_its_caches_for_the_next_load(model_file: Path,
                                                               tmp_path: Path) -> None:
    cache = PromptCache(2**24, tmp_path / "cache", 2**24)
    first = load(model_file, cache, parallel=2)
    ask(first, conversation("a"))
    first.close()
    # a new server: only the disk is left
    again = load(model_file, PromptCache(2**24, tmp_path / "cache", 2**24), parallel=2)
    try:
        stats = ask(again, conversation("a")).stats
        assert stats.cached_tokens == stats.prompt_tokens - 1
    finally:
        again.close()


def test_a_state_is_never_restored_into_a_differently_shaped_context(
        model_file: Path) -> None:
    cache = PromptCache(2**24)
    first = load(model_file, cache, parallel=1, context_length=4096)
    ask(first, conversation("a"))
    first.close()
    other = load(model_file, cache, parallel=1, context_length=2048)
    try:
        assert ask(other, conversation("a")).stats.cached_tokens == 0
    finally:
        other.close()
