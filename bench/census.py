"""The UCI Census-Income (KDD) files, read as the MMoE paper uses them (Ma et al., KDD 2018,
section 6.2): 40 features and two tasks, income over 50K and marital status "Never married".

The files (`census-income.data.gz`, `census-income.test.gz` from the UCI Machine Learning
Repository) are gzip CSV without a header, fields separated by ", ". `read_census` names the 42
columns, strips the spaces and adds the labels `income` and `marital`.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

COLUMNS = [
    "age",
    "class_worker",
    "det_ind_code",
    "det_occ_code",
    "education",
    "wage_per_hour",
    "hs_college",
    "marital_stat",
    "major_ind_code",
    "major_occ_code",
    "race",
    "hisp_origin",
    "sex",
    "union_member",
    "unemp_reason",
    "full_or_part_emp",
    "capital_gains",
    "capital_losses",
    "stock_dividends",
    "tax_filer_stat",
    "region_prev_res",
    "state_prev_res",
    "det_hh_fam_stat",
    "det_hh_summ",
    "instance_weight",
    "mig_chg_msa",
    "mig_chg_reg",
    "mig_move_reg",
    "mig_same",
    "mig_prev_sunbelt",
    "num_emp",
    "fam_under_18",
    "country_father",
    "country_mother",
    "country_self",
    "citizenship",
    "own_or_self",
    "vet_question",
    "vet_benefits",
    "weeks_worked",
    "year",
    "income_50k",
]
# Quantities; every other feature column is a code or a category.
NUMERIC = [
    "age",
    "wage_per_hour",
    "capital_gains",
    "capital_losses",
    "stock_dividends",
    "num_emp",
    "weeks_worked",
]
# The two label columns, and the survey weight (how many people a row stands for: not a feature).
NOT_FEATURES = ("marital_stat", "income_50k", "instance_weight")
CATEGORICAL = [c for c in COLUMNS if c not in NUMERIC and c not in NOT_FEATURES]


def read_census(path: str | Path) -> pa.Table:
    """A census-income file as a table: the 42 columns (numbers as float64, the rest as
    strings without their leading space), plus `income` (1: "50000+.") and `marital` (1:
    "Never married")."""
    table = pcsv.read_csv(
        path,
        read_options=pcsv.ReadOptions(column_names=COLUMNS),
        convert_options=pcsv.ConvertOptions(column_types=dict.fromkeys(COLUMNS, pa.string())),
    )
    columns = {}
    for name in COLUMNS:
        values = pc.utf8_trim_whitespace(table.column(name))
        columns[name] = pc.cast(values, pa.float64()) if name in NUMERIC else values
    income = pc.equal(columns["income_50k"], "50000+.")
    marital = pc.equal(columns["marital_stat"], "Never married")
    columns["income"] = pc.cast(income, pa.int64())
    columns["marital"] = pc.cast(marital, pa.int64())
    return pa.table(columns)
