"""Item features for a real model: `mmoe items build` from its training data (reading the model
or the run), `mmoe items push` to a real redis-server, and lookups that feed the graph what an
inline request of each item's last training row would."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mmoe.contract.values import graph_inputs
from mmoe.service.item_build import model_features
from mmoe.service.items import ItemRows, ItemTable, RedisItemStore
from tests.cli import mmoe
from tests.redis_server import RedisServer


@pytest.mark.slow
def test_build_push_and_lookups_feed_what_the_last_training_rows_would(
    tiny_data: Path, tiny_context_run: Path, tiny_context_onnx: Path, tmp_path: Path
) -> None:
    by_model, by_run = tmp_path / "items.parquet", tmp_path / "from_run.parquet"
    common = ["items", "build", "--data", str(tiny_data), "--key", "item_id"]
    mmoe(*common, "--out", str(by_model), "--model", str(tiny_context_onnx))
    mmoe(*common, "--out", str(by_run), "--config", str(tiny_context_run))
    assert pq.read_table(by_model).equals(pq.read_table(by_run))

    features = model_features(tiny_context_onnx)
    table = ItemTable.load(by_model, features)
    # The demo-shaped model declares the user's fields and hour/tags context: what remains
    # per candidate is the item.
    assert table.key == "item_id" and [f.name for f in table.features] == ["category", "price"]
    data = pq.read_table(tiny_data).to_pydict()
    last = {item: j for j, item in enumerate(data["item_id"])}
    assert table.rows == len(last)
    items = sorted(last)[:: max(1, len(last) // 50)]
    rows = table.lookup(np.array([*items, "not-an-item"], dtype=object))
    inline = graph_inputs(
        table.features,
        {f.name: [data[f.name][last[i]] for i in items] for f in table.features},
        len(items),
    )
    for name, want in inline.items():
        np.testing.assert_array_equal(rows.columns[name][:-1], want, err_msg=name)
    assert rows.found.tolist() == [True] * len(items) + [False]

    server = RedisServer(tmp_path).start()
    try:
        mmoe(
            "items",
            "push",
            "--data",
            str(by_model),
            "--redis",
            server.url,
            "--model",
            str(tiny_context_onnx),
        )

        async def lookup() -> ItemRows:
            store = await RedisItemStore.connect(server.url, features)
            try:
                return await store.alookup(np.array([*items, "not-an-item"], dtype=object))
            finally:
                await store.aclose()

        stored = asyncio.run(lookup())
    finally:
        server.kill()
    for name, column in rows.columns.items():
        np.testing.assert_array_equal(stored.columns[name], column, err_msg=name)
    assert stored.outcome.tolist() == rows.outcome.tolist()
