"""Routing and the repository's rules, in-process: version policies, what a reading of the
repository wants loaded and unloaded, routing.yaml's checks, arms that keep a caller in one arm
and share callers as weighted, and the shadow's share."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

from mmoe.service.repository import RepositoryError, VersionPolicy, read_model_config, scan
from mmoe.service.routing import Arms, Router, RoutingConfig, caller_point, parse_routing


def policy(text: str) -> VersionPolicy:
    import yaml

    return VersionPolicy.model_validate(yaml.safe_load(text))


def test_version_policies_have_tritons_names_and_meaning() -> None:
    available = [1, 2, 7, 8, 12]
    assert VersionPolicy().select(available) == {12}  # latest 1 by default
    assert policy("latest: {num_versions: 2}").select(available) == {8, 12}
    assert policy("all: {}").select(available) == set(available)
    assert policy("specific: {versions: [7, 8, 99]}").select(available) == {7, 8}
    with pytest.raises(ValueError, match="one of latest, all, specific"):
        policy("{all: {}, latest: {num_versions: 1}}")
    with pytest.raises(ValueError):
        policy("latest: {num_versions: 0}")


def test_a_bad_model_config_names_the_file_and_the_key(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("version_policy: {specific: {versions: []}}")
    with pytest.raises(RepositoryError, match=r"config.yaml: version_policy.specific.versions"):
        read_model_config(tmp_path)
    (tmp_path / "config.yaml").write_text("version_polcy: {all: {}}")
    with pytest.raises(RepositoryError, match="version_polcy"):
        read_model_config(tmp_path)


def make_repository(root: Path, model: Path, layout: dict[str, list[int]]) -> None:
    for name, versions in layout.items():
        for v in versions:
            (root / name / str(v)).mkdir(parents=True, exist_ok=True)
            shutil.copy(model, root / name / str(v) / "model.onnx")


def test_a_reading_of_the_repository_says_what_to_load_and_unload(tmp_path: Path) -> None:
    model = tmp_path / "file.onnx"
    model.write_bytes(b"not read here")
    repo = tmp_path / "repo"
    make_repository(repo, model, {"ranker": [1, 2, 3], "other": [5], ".hidden": [1]})
    (repo / "ranker" / "4").mkdir()  # no model.onnx: not a version
    (repo / "ranker" / "v5").mkdir()  # not a number: not a version
    (repo / "broken").mkdir()
    (repo / "broken" / "1").mkdir()
    shutil.copy(model, repo / "broken" / "1" / "model.onnx")
    (repo / "broken" / "config.yaml").write_text("version_policy: nonsense")
    listing = scan(repo)
    assert sorted(listing.versions) == ["broken", "other", "ranker"]
    assert sorted(listing.versions["ranker"]) == [1, 2, 3]
    assert "broken" in listing.errors and "version_policy" in listing.errors["broken"]

    wanted = listing.wanted({"ranker": {"1"}})  # routing names version 1: loaded too
    assert sorted(wanted.files) == [("other", "5"), ("ranker", "1"), ("ranker", "3")]
    load, _ = wanted.diff({})
    assert [(v.name, v.version) for v in load] == [("other", "5"), ("ranker", "1"), ("ranker", "3")]
    loaded = {k: v.stamp for k, v in wanted.files.items()} | {("ranker", "2"): load[0].stamp}
    assert wanted.diff(loaded) == ([], [("ranker", "2")])
    # A file replaced in place is loaded again.
    (repo / "ranker" / "3" / "model.onnx").write_bytes(b"a new file")
    load, _ = scan(repo).wanted({"ranker": {"1"}}).diff(loaded)
    assert [(v.name, v.version) for v in load] == [("ranker", "3")]
    # Models unloaded through the API are not wanted.
    assert sorted(scan(repo).wanted({}, skipped={"ranker"}).files) == [("other", "5")]
    assert "cannot be read" in scan(tmp_path / "nowhere").errors[""]


def test_routing_files_are_checked_with_the_key_path_in_the_message() -> None:
    config = parse_routing(
        """
        default: ranker
        models:
          ranker:
            key: context.user_id
            arms: {"7": 90, 8: 10}
            shadow: {version: 9, percent: 100}
        """
    )
    assert config.models["ranker"].arms == {"7": 90, "8": 10}
    assert config.models["ranker"].feature == "user_id"
    assert config.pinned() == {"ranker": {"7", "8", "9"}}
    bad = {
        "models: {ranker: {arms: {'7': 90, '8': 20}}}": "add up to 110",
        "models: {ranker: {arms: {'7': 100}, shaddow: {version: 8}}}": "shaddow",
        "models: {ranker: {arms: {'latest': 100}}}": "not a version",
        "models: {ranker: {shadow: {version: '8', percent: 0}}}": "percent",
        "default: [": "not YAML",
    }
    for text, reason in bad.items():
        with pytest.raises(RepositoryError, match=reason):
            parse_routing(text)


def test_a_caller_stays_in_one_arm_and_the_arms_share_callers_as_weighted() -> None:
    arms = Arms.of("ranker", {"7": 90, "8": 10})
    keys = [f"user-{i}" for i in range(20_000)]
    first = [arms.pick(k) for k in keys]
    assert [arms.pick(k) for k in keys] == first  # the same caller, the same arm
    share = Counter(first)["8"] / len(keys)
    assert abs(share - 0.10) < 0.01, share
    # A ramp to 50/50 moves callers only from 7 to 8, never back.
    ramped = Arms.of("ranker", {"7": 50, "8": 50})
    moved = Counter((a, ramped.pick(k)) for a, k in zip(first, keys, strict=True))
    assert moved[("8", "7")] == 0 and abs(moved[("7", "8")] / len(keys) - 0.40) < 0.015
    # Another model's experiment puts the same callers in arms of its own.
    other = Arms.of("other", {"1": 90, "2": 10})
    both = sum(a == "8" and other.pick(k) == "2" for a, k in zip(first, keys, strict=True))
    assert abs(both / len(keys) - 0.01) < 0.005
    assert arms.pick(None) == "7"  # no key: the arm with the largest weight
    assert 0 <= caller_point("ranker", "u1") < 1


def test_the_router_sends_requests_to_arms_latest_versions_and_shadows() -> None:
    config = RoutingConfig.model_validate(
        {
            "default": "ranker",
            "models": {
                "ranker": {"key": "user_id", "arms": {"7": 50, "8": 50}},
                "other": {"shadow": {"version": "3", "percent": 25}},
            },
        }
    )
    router = Router(config, {"ranker": {"7", "8", "9"}, "other": {"2", "3"}})
    assert router.default == "ranker"
    assert router.targets() == {("ranker", "7"), ("ranker", "8"), ("other", "3")}
    assert router.route("ranker", "9", "u1").version == "9"  # a named version: no arms
    assert {router.route("ranker", None, f"u{i}").version for i in range(50)} == {"7", "8"}
    routes = [router.route("other", None, None) for _ in range(4000)]
    assert {r.version for r in routes} == {"3"}  # the latest
    assert {r.shadow for r in routes} == {None}  # the shadow is the version answering
    router = Router(config, {"ranker": {"7", "8"}, "other": {"2"}})
    shadowed = [router.route("other", "2", None).shadow for _ in range(4000)]
    assert shadowed.count(None) == 4000  # a named version bypasses the shadow too
    config = RoutingConfig.model_validate(
        {"models": {"other": {"arms": {"2": 100}, "shadow": {"version": "3", "percent": 25}}}}
    )
    router = Router(config, {"other": {"2", "3"}})
    shadowed = [router.route("other", None, None).shadow for _ in range(4000)]
    assert abs(shadowed.count("3") / 4000 - 0.25) < 0.04
    assert Router(RoutingConfig(), {"a": {"1"}, "b": {"1"}}).default is None
