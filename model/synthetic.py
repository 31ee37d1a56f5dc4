"""Generated data sets (seeded, deterministic): a click/conversion ranking log, and the MMoE
paper's two-task regression data with controllable task correlation."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def synthetic_ranking(rows: int, seed: int = 7, world_seed: int = 0) -> pa.Table:
    """An impression log with string ids, numbers, a tag list and labels `clk` and `buy`.

    Clicks depend on user-category affinity (through age and gender), price, brand and hour;
    purchases happen only after a click and depend on price and brand quality differently, so
    the two tasks are related but not the same.

    `world_seed` draws the world: users' traits, items' categories, prices and brands, and how
    they drive clicks and purchases. `seed` draws the impressions from it (who sees what, when,
    and the outcomes). Files with different `seed`s and one `world_seed` are samples of the same
    world, so one can validate a model trained on another.
    """
    world = np.random.default_rng([0, world_seed])
    n_users, n_items, n_cats, n_brands = 4000, 20000, 40, 300
    user_age = world.integers(0, 7, n_users)
    user_gender = world.integers(0, 2, n_users)
    user_bias = world.normal(0, 0.5, n_users)
    item_cat = world.integers(0, n_cats, n_items)
    item_price = np.round(world.lognormal(3.0, 1.0, n_items), 2)
    item_brands = [
        world.choice(n_brands, size=world.integers(0, 4), replace=False) for _ in range(n_items)
    ]
    age_cat = world.normal(0, 1.0, (7, n_cats))
    gender_cat = world.normal(0, 0.7, (2, n_cats))
    brand_pop = world.normal(0, 0.6, n_brands)
    brand_quality = world.normal(0, 0.8, n_brands)
    hour_effect = 0.4 * np.sin(np.arange(24) / 24 * 2 * np.pi)
    user_order = world.permutation(n_users)  # which users are the frequent ones

    sample = np.random.default_rng([1, seed])
    users = np.minimum(sample.zipf(1.3, rows) - 1, n_users - 1)
    users = user_order[users]
    items = sample.integers(0, n_items, rows)
    hours = sample.integers(0, 24, rows)
    cats = item_cat[items]
    price = item_price[items]
    pop = np.array([brand_pop[b].mean() if len(b) else 0.0 for b in item_brands])[items]
    quality = np.array([brand_quality[b].mean() if len(b) else -0.5 for b in item_brands])[items]

    affinity = age_cat[user_age[users], cats] + gender_cat[user_gender[users], cats]
    z_click = (
        -1.6 + 0.9 * affinity + user_bias[users] + pop - 0.25 * np.log1p(price) + hour_effect[hours]
    )
    clk = sample.random(rows) < _sigmoid(z_click)
    z_buy = (
        -1.2 + 0.5 * affinity + 1.2 * quality - 0.5 * np.log1p(price) + 0.3 * user_age[users] / 6
    )
    buy = clk & (sample.random(rows) < _sigmoid(z_buy))

    # Some missing values, as in real logs.
    price_col = price.astype(np.float64)
    price_col[sample.random(rows) < 0.02] = np.nan
    brands = [[f"b{b}" for b in item_brands[i]] for i in items]
    return pa.table(
        {
            "user_id": pa.array([f"u{u}" for u in users]),
            "item_id": pa.array([f"i{i}" for i in items]),
            "category": pa.array([f"c{c}" for c in cats]),
            "age_level": pa.array(user_age[users].astype(np.int64)),
            "gender": pa.array(np.where(user_gender[users] == 1, "F", "M")),
            "price": pa.array(price_col, from_pandas=True),
            "hour": pa.array(hours.astype(np.float64)),
            "tag_brand_list": pa.array(brands, pa.list_(pa.string())),
            "clk": pa.array(clk.astype(np.int64)),
            "buy": pa.array(buy.astype(np.int64)),
        }
    )


def paper_synthetic(
    rows: int,
    correlation: float,
    dim: int = 100,
    num_sines: int = 10,
    scale: float = 1.0,
    noise_std: float = 0.01,
    seed: int = 0,
    sine_seed: int = 0,
    sine_params: str = "normal",
) -> pa.Table:
    """Two regression tasks whose correlation is controlled (Ma et al., KDD 2018, section 3.2).

    u1, u2: random orthogonal unit vectors in R^d. w1 = c*u1, w2 = c*(p*u1 + sqrt(1-p^2)*u2).
    x ~ N(0, I). y_i = w_i.x + sum_{j<m} sin(alpha_j * w_i.x + beta_j) + N(0, noise_std^2).

    The paper calls alpha_j, beta_j "given parameters" and gives no values. `sine_params`:
    "normal": alpha_j, beta_j ~ N(0, 1), drawn from `sine_seed` (mostly slow sines: the labels
    are close to linear in w_i.x); "index": alpha_j = j + 1, beta_j = j^2, the values of Google
    Research's generator for this experiment (sines up to m times faster than the linear
    term: the nonlinearity the experiment is about). Both tasks share them, so data sets with
    different `seed`s (new u1, u2, x, noise) share them. Columns x0..x{d-1}, y1, y2.
    """
    if not -1.0 <= correlation <= 1.0:
        raise ValueError("correlation must be in [-1, 1]")
    if rows < 1 or dim < 2 or num_sines < 0 or noise_std < 0:
        raise ValueError("need rows >= 1, dim >= 2, sines >= 0 and noise >= 0")
    if sine_params == "index":
        alpha = np.arange(1, num_sines + 1, dtype=np.float64)
        beta = np.arange(num_sines, dtype=np.float64) ** 2
    elif sine_params == "normal":
        shape = np.random.default_rng(sine_seed)
        alpha = shape.normal(size=num_sines)
        beta = shape.normal(size=num_sines)
    else:
        raise ValueError(f"sine_params must be 'normal' or 'index', got {sine_params!r}")
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(dim, 2)))
    u1, u2 = q[:, 0], q[:, 1]
    w1 = scale * u1
    w2 = scale * (correlation * u1 + np.sqrt(1 - correlation**2) * u2)
    x = rng.normal(size=(rows, dim))

    def target(w: np.ndarray) -> np.ndarray:
        z = x @ w
        return z + np.sin(np.outer(z, alpha) + beta).sum(1) + rng.normal(0, noise_std, rows)

    cols = {f"x{i}": pa.array(x[:, i]) for i in range(dim)}
    cols["y1"] = pa.array(target(w1))
    cols["y2"] = pa.array(target(w2))
    return pa.table(cols)
