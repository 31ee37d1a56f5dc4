"""A generated impression log with the columns of the Taobao display-ad data set that EasyRec's
MMoE sample (`mmoe_on_taobao.config`) trains on, for `configs/easyrec_taobao.yaml`.

User columns (profile and behaviour tags) are fixed per user, ad columns per ad; clicks depend
on user/category affinity, brand popularity, price and placement, purchases on brand quality and
price, so the model has something to learn. Seeded and deterministic: `--world-seed` draws the
users, ads and their effects, `--seed` the impressions from them.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

USER_COLUMNS = [
    "user_id",
    "cms_segid",
    "cms_group_id",
    "final_gender_code",
    "age_level",
    "pvalue_level",
    "shopping_level",
    "occupation",
    "new_user_class_level",
    "tag_category_list",
    "tag_brand_list",
]
AD_COLUMNS = ["adgroup_id", "cate_id", "campaign_id", "customer", "brand", "price"]
# Fields shared by every candidate of one ranking request: the user and the placement.
CONTEXT_FEATURES = [*USER_COLUMNS, "pid"]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _ids(prefix: str, values: np.ndarray) -> pa.Array:
    return pa.array(np.char.add(prefix, values.astype(str)).astype(object))


def _lists(rng: np.random.Generator, n: int, pool: int, prefix: str, max_len: int) -> pa.Array:
    lengths = rng.integers(0, max_len + 1, n)
    flat = rng.integers(0, pool, int(lengths.sum()))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), _ids(prefix, flat))


def taobao_like(rows: int, seed: int = 7, world_seed: int = 0) -> pa.Table:
    """`rows` impressions with the Taobao columns above plus `pid`, and labels `clk`, `buy`.

    `world_seed` draws the world: users' profiles and tags, ads' categories, brands and prices,
    and how they drive clicks and purchases. `seed` draws the impressions from it (who sees which
    ad, where, and the outcomes). Files with different `seed`s and one `world_seed` are samples of
    the same world, so a model trained on one validates on another (as `synthetic_ranking`)."""
    world = np.random.default_rng([0, world_seed])
    n_users, n_ads, n_cates, n_brands = 50_000, 80_000, 2_000, 10_000
    # Users: profile fields as small integers (as in the data set), behaviour as tag lists.
    age = world.integers(1, 7, n_users)
    gender = world.integers(1, 3, n_users)
    profile = {
        "cms_segid": world.integers(0, 97, n_users),
        "cms_group_id": world.integers(0, 13, n_users),
        "final_gender_code": gender,
        "age_level": age,
        "pvalue_level": world.integers(0, 4, n_users),
        "shopping_level": world.integers(1, 4, n_users),
        "occupation": world.integers(0, 2, n_users),
        "new_user_class_level": world.integers(0, 5, n_users),
    }
    user_bias = world.normal(0, 0.5, n_users)
    user_tags_cate = _lists(world, n_users, n_cates, "", 8)
    user_tags_brand = _lists(world, n_users, n_brands, "", 8)
    # Ads.
    ad_cate = world.integers(0, n_cates, n_ads)
    ad_brand = world.integers(0, n_brands, n_ads)
    ad_campaign = world.integers(0, 40_000, n_ads)
    ad_customer = world.integers(0, 25_000, n_ads)
    ad_price = np.round(world.lognormal(4.0, 1.2, n_ads), 2)
    age_cate = world.normal(0, 1.0, (7, n_cates))
    gender_cate = world.normal(0, 0.6, (3, n_cates))
    brand_pop = world.normal(0, 0.6, n_brands)
    brand_quality = world.normal(0, 0.8, n_brands)
    user_order = world.permutation(n_users)  # which users are the frequent ones

    rng = np.random.default_rng([1, seed])
    users = user_order[np.minimum(rng.zipf(1.2, rows) - 1, n_users - 1)]
    ads = rng.integers(0, n_ads, rows)
    pid = rng.integers(0, 2, rows)
    cate, brand, price = ad_cate[ads], ad_brand[ads], ad_price[ads]
    affinity = age_cate[age[users], cate] + gender_cate[gender[users], cate]
    z_click = (
        -2.0
        + 0.9 * affinity
        + user_bias[users]
        + brand_pop[brand]
        - 0.2 * np.log1p(price)
        + 0.3 * pid
    )
    clk = rng.random(rows) < _sigmoid(z_click)
    z_buy = -1.0 + 0.4 * affinity + 1.2 * brand_quality[brand] - 0.4 * np.log1p(price)
    buy = clk & (rng.random(rows) < _sigmoid(z_buy))

    price_col = price.astype(np.float64)
    price_col[rng.random(rows) < 0.01] = np.nan
    brand_col = _ids("", brand)
    brand_col = pa.array(
        np.where(rng.random(rows) < 0.05, None, brand_col.to_numpy(zero_copy_only=False))
    )
    take = pa.array(users)
    columns: dict[str, pa.Array] = {"user_id": _ids("", users)}
    columns.update({k: pa.array(v[users].astype(np.int64)) for k, v in profile.items()})
    columns["tag_category_list"] = user_tags_cate.take(take)
    columns["tag_brand_list"] = user_tags_brand.take(take)
    columns.update(
        {
            "adgroup_id": _ids("", ads),
            "cate_id": _ids("", cate),
            "campaign_id": _ids("", ad_campaign[ads]),
            "customer": _ids("", ad_customer[ads]),
            "brand": brand_col,
            "price": pa.array(price_col, from_pandas=True),
            "pid": _ids("430548_", 1007 + pid),
            "clk": pa.array(clk.astype(np.int64)),
            "buy": pa.array(buy.astype(np.int64)),
        }
    )
    return pa.table(columns)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from mmoe.model.data import write_table

    parser = argparse.ArgumentParser(prog="python -m mmoe.bench.taobao", description=__doc__)
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument(
        "--seed", type=int, default=7, help="seed of the rows drawn from the world (default 7)"
    )
    parser.add_argument(
        "--world-seed",
        type=int,
        default=0,
        help="seed of the world: users, ads and what drives clicks and purchases (default 0); "
        "files with another --seed and the same --world-seed validate each other",
    )
    parser.add_argument("--out", required=True, help="FILE.parquet or FILE.csv")
    args = parser.parse_args(argv)
    write_table(taobao_like(args.rows, args.seed, args.world_seed), args.out)
    print(f"wrote {args.rows} rows to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
