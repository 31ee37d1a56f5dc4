"""Reading a server's /metrics in tests: every sample by name and labels, and sums over the
samples whose labels include the ones asked for (most series also carry `model` and `version`,
which a test that does not care about them leaves out)."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.server import ServerProcess

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(server: ServerProcess) -> Samples:
    r = httpx.get(f"{server.url}/metrics", timeout=30)
    assert r.status_code == 200, r.text
    return parse(r.text)


def value(samples: Samples, name: str, /, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


def by_labels(samples: Samples, name: str, *keys: str) -> dict[tuple[str, ...], float]:
    """{(label values in `keys` order): value} of one metric's samples, summed over the labels
    not in `keys`."""
    out: dict[tuple[str, ...], float] = {}
    for (n, labels), v in samples.items():
        if n == name:
            d = dict(labels)
            k = tuple(d.get(key, "") for key in keys)
            out[k] = out.get(k, 0.0) + v
    return out


def delta(before: Samples, after: Samples, name: str, *keys: str) -> dict[tuple[str, ...], float]:
    old = by_labels(before, name, *keys)
    return {k: v - old.get(k, 0.0) for k, v in by_labels(after, name, *keys).items()}
