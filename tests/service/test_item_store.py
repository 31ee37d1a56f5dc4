"""The Redis item store (service/items.py) against a real redis-server: what `mmoe items push`
writes reads back as the file table reads it; the LRU and TTL in front of Redis; an outage
answered from the cache and then with defaults, counted and never raised, and the recovery."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from mmoe.service.item_push import push_table
from mmoe.service.items import (
    ERROR,
    HIT,
    MISS,
    STALE,
    ItemRows,
    ItemSource,
    ItemStoreUnavailable,
    ItemTable,
    ItemTableError,
    RedisItemStore,
)
from tests.redis_server import RedisServer
from tests.server import free_port
from tests.service.test_items import FEATURES, HELD, RAW, assert_rows, raw_rows, write

IDS = ["c", "zz", "a", "b", "a", "d", ""]


def ids(*values: str) -> np.ndarray:
    return np.array(values, dtype=object)


def assert_same(got: ItemRows, want: ItemRows) -> None:
    assert list(got.columns) == list(want.columns)
    for name, column in want.columns.items():
        assert got.columns[name].dtype == column.dtype, name
        np.testing.assert_array_equal(got.columns[name], column, err_msg=name)
    assert got.found.tolist() == want.found.tolist()
    assert got.outcome.tolist() == want.outcome.tolist()


@pytest.mark.parametrize("with_model", [True, False])
def test_push_then_lookup_equals_the_file_tables_lookup(
    redis_server: RedisServer, tmp_path: Path, with_model: bool
) -> None:
    path = write(tmp_path / "items.parquet", RAW)
    if with_model:
        report = push_table(path, redis_server.url, features=FEATURES)
    else:
        report = push_table(path, redis_server.url, key="item_id", chunk_rows=3)
    assert report.items == 4
    table = ItemTable.load(path, FEATURES)

    async def lookups() -> tuple[ItemRows, ItemRows]:
        store = await RedisItemStore.connect(redis_server.url, FEATURES)
        assert isinstance(store, ItemSource)
        assert store.key == "item_id" and store.features == HELD and store.rows == 4
        cold = await store.alookup(ids(*IDS))
        warm = await store.alookup(ids(*IDS))
        await store.aclose()
        return cold, warm

    cold, warm = asyncio.run(lookups())
    assert isinstance(table, ItemSource)  # the interface the decoder calls
    assert_same(cold, table.lookup(ids(*IDS)))
    assert_same(warm, table.lookup(ids(*IDS)))
    assert_rows(warm, HELD, raw_rows(IDS))


def test_integer_ids_and_a_namespace_in_the_url(redis_server: RedisServer, tmp_path: Path) -> None:
    path = write(tmp_path / "items.parquet", {"item_id": [10, 20], "price": [1.5, None]})
    url = redis_server.url + "?namespace=shop7"
    push_table(path, url, features=FEATURES)
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    assert client.get("shop7:item:20") == '{"item_id": 20}'
    assert client.get("shop7:item:10") == '{"item_id": 10, "price": 1.5}'
    assert client.hget("shop7:items", "key") == "item_id"
    client.close()

    async def lookup() -> ItemRows:
        store = await RedisItemStore.connect(url, FEATURES)
        try:
            return await store.alookup(ids("20", "10", "30"))
        finally:
            await store.aclose()

    rows = asyncio.run(lookup())
    assert rows.found.tolist() == [True, True, False]
    np.testing.assert_array_equal(rows.columns["price"], np.array([np.nan, 1.5, np.nan], "f4"))


def test_a_hot_id_costs_one_redis_call_per_ttl(redis_server: RedisServer, tmp_path: Path) -> None:
    push_table(write(tmp_path / "items.parquet", RAW), redis_server.url, features=FEATURES)

    async def run() -> tuple[RedisItemStore, int]:
        store = await RedisItemStore.connect(redis_server.url, FEATURES, ttl_s=0.5)
        before = redis_server.calls("mget")
        for _ in range(20):  # "a" exists, "zz" does not: a miss is cached too
            rows = await store.alookup(ids("a", "zz", "a"))
            assert rows.outcome.tolist() == [HIT, MISS, HIT]
        assert store.calls == 1 and redis_server.calls("mget") - before == 1
        await asyncio.sleep(0.6)
        for _ in range(20):
            await store.alookup(ids("a", "zz"))
        await store.aclose()
        return store, before

    store, before = asyncio.run(run())
    assert store.calls == 2 and redis_server.calls("mget") - before == 2


def test_the_cache_holds_at_most_cache_items_the_least_recently_used_go_first(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    push_table(write(tmp_path / "items.parquet", RAW), redis_server.url, features=FEATURES)

    async def run() -> list[int]:
        store = await RedisItemStore.connect(redis_server.url, FEATURES, cache_items=2)
        calls = []
        for batch in (["a"], ["b"], ["a"], ["c"], ["a"], ["b"], ["c", "d", "a"], ["a"]):
            rows = await store.alookup(ids(*batch))
            assert_rows(rows, HELD, raw_rows(batch))
            calls.append(store.calls)
        await store.aclose()
        return calls

    # a, b fetched; a cached; c evicts b; a cached; b evicts c; c and d fetched, a cached:
    # three ids for two places, so b goes, then a, the least recent of the three; a fetched.
    assert asyncio.run(run()) == [1, 2, 2, 3, 3, 4, 5, 6]


def test_an_outage_degrades_to_the_cache_then_to_defaults_and_recovers(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    path = write(tmp_path / "items.parquet", RAW)
    push_table(path, redis_server.url, features=FEATURES)
    table = ItemTable.load(path, FEATURES)

    async def run() -> RedisItemStore:
        store = await RedisItemStore.connect(
            redis_server.url, FEATURES, ttl_s=0.3, timeout_s=0.5, retry_s=0.1
        )
        assert (await store.alookup(ids("a", "b"))).outcome.tolist() == [HIT, HIT]
        redis_server.kill()
        # Cached and fresh: served as before; never cached: defaults, counted as errors.
        rows = await store.alookup(ids("a", "c", "zz"))
        assert rows.outcome.tolist() == [HIT, ERROR, ERROR]
        assert rows.found.tolist() == [True, False, False]
        assert_rows(rows, HELD, raw_rows(["a", "missing", "missing"]))
        await asyncio.sleep(0.35)  # past the TTL: the cached entries answer, as stale
        t0 = time.monotonic()
        rows = await store.alookup(ids("b", "a", "c"))
        assert time.monotonic() - t0 < 0.5
        assert rows.outcome.tolist() == [STALE, STALE, ERROR]
        assert_rows(rows, HELD, raw_rows(["b", "a", "missing"]))
        assert rows.counts() == {"hit": 0, "miss": 0, "stale": 2, "error": 1}
        assert store.failures >= 1
        # Redis back (empty: it kept nothing), the table pushed again: lookups recover.
        redis_server.start()
        push_table(path, redis_server.url, features=FEATURES)
        deadline = time.monotonic() + 5
        while True:
            rows = await store.alookup(ids("c", "zz", "a"))
            if rows.outcome.tolist() == [HIT, MISS, HIT] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert_same(rows, table.lookup(ids("c", "zz", "a")))
        await store.aclose()
        return store

    asyncio.run(run())


def test_concurrent_lookups_agree_with_the_table(redis_server: RedisServer, tmp_path: Path) -> None:
    path = write(tmp_path / "items.parquet", RAW)
    push_table(path, redis_server.url, features=FEATURES)
    table = ItemTable.load(path, FEATURES)
    batches = [IDS, IDS[::-1], ["a"], ["zz", "d"], IDS] * 4

    async def run() -> list[ItemRows]:
        store = await RedisItemStore.connect(redis_server.url, FEATURES, cache_items=3)
        try:
            return list(await asyncio.gather(*(store.alookup(ids(*b)) for b in batches)))
        finally:
            await store.aclose()

    for batch, rows in zip(batches, asyncio.run(run()), strict=True):
        assert_same(rows, table.lookup(ids(*batch)))

    async def reopened() -> list[Any]:
        """open() again (a refresh) while lookups wait on Redis: each still answers."""
        store = await RedisItemStore.connect(redis_server.url, FEATURES, cache_items=3)
        try:
            lookups = [store.alookup(ids(*b)) for b in batches]
            return list(await asyncio.gather(*lookups[:10], store.open(), *lookups[10:]))
        finally:
            await store.aclose()

    answers = asyncio.run(reopened())
    del answers[10]  # open()'s
    for batch, rows in zip(batches, answers, strict=True):
        assert_same(rows, table.lookup(ids(*batch)))


def test_open_checks_the_manifest_as_a_file_is_checked(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async def connect(url: str, features: Any = FEATURES) -> RedisItemStore:
        return await RedisItemStore.connect(url, features)

    with pytest.raises(ItemTableError, match=r"no item table .* push one with `mmoe items push`"):
        asyncio.run(connect(redis_server.url))
    push_table(write(tmp_path / "items.parquet", RAW), redis_server.url, features=FEATURES)
    without_price = [f for f in FEATURES if f.name != "price"]
    with pytest.raises(ItemTableError, match="column 'price': the model has no feature"):
        asyncio.run(connect(redis_server.url, without_price))
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.hset("mmoe:items", "columns", "[1]")
    client.close()
    with pytest.raises(ItemTableError, match="malformed manifest mmoe:items"):
        asyncio.run(connect(redis_server.url))
    t0 = time.monotonic()
    with pytest.raises(ItemStoreUnavailable, match="cannot read the item manifest"):
        asyncio.run(connect(f"redis://:secret@127.0.0.1:{free_port()}/0"))
    assert time.monotonic() - t0 < 2


def test_a_value_of_the_wrong_type_reads_as_null(redis_server: RedisServer, tmp_path: Path) -> None:
    push_table(write(tmp_path / "items.parquet", RAW), redis_server.url, features=FEATURES)
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    bad = {
        "price": "12",
        "category": [1],
        "tags": 5,
        "brands": {"b": 1},
        "shop": 3.0,
        "stock": 1e39,
    }
    client.set("mmoe:item:a", json.dumps(bad))
    client.set("mmoe:item:b", "not json")
    client.hset("mmoe:item:zz", "price", "1")  # not a string: MGET reads it as no item
    client.close()

    async def lookup() -> ItemRows:
        store = await RedisItemStore.connect(redis_server.url, FEATURES)
        try:
            return await store.alookup(ids("a", "b", "zz"))
        finally:
            await store.aclose()

    rows = asyncio.run(lookup())
    assert rows.outcome.tolist() == [HIT, HIT, MISS]
    # An integral number is an id, as in a table file; the rest read as null.
    assert_rows(rows, HELD, {**raw_rows(["missing"] * 3), "shop": [3, None, None]})


def test_push_replaces_an_items_fields_and_prune_drops_the_items_not_pushed(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    push_table(write(tmp_path / "items.parquet", RAW), redis_server.url, features=FEATURES)
    newer = write(tmp_path / "newer.parquet", {"item_id": ["a", "e"], "price": [9.0, 1.0]})
    report = push_table(newer, redis_server.url, features=FEATURES, prune=True)
    assert (report.items, report.pruned) == (2, 3)
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    assert client.get("mmoe:item:a") == '{"item_id": "a", "price": 9.0}'
    assert sorted(client.scan_iter(match="mmoe:item:*")) == ["mmoe:item:a", "mmoe:item:e"]
    assert client.hget("mmoe:items", "columns") == '{"item_id": "string", "price": "float"}'
    client.close()


def test_push_refuses_what_the_model_cannot_serve_before_writing(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    path = write(tmp_path / "items.parquet", {"item_id": ["a"], "price": ["12"]})
    with pytest.raises(ItemTableError, match="column 'price' is string"):
        push_table(path, redis_server.url, features=FEATURES)
    with pytest.raises(ItemTableError, match="name the key column"):
        push_table(path, redis_server.url)
    dup = write(tmp_path / "dup.parquet", {"item_id": ["a", "a"]})
    with pytest.raises(ItemTableError, match="duplicate keys"):
        push_table(dup, redis_server.url, key="item_id")
    client = redis.Redis.from_url(redis_server.url)
    assert client.dbsize() == 0
    client.close()
    with pytest.raises(ItemStoreUnavailable):
        push_table(
            write(tmp_path / "ok.parquet", RAW), f"redis://127.0.0.1:{free_port()}/0", key="item_id"
        )
