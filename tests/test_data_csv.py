"""data=csv: label columns, prospective and patient splits, mixed image formats, bad tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import compose_cfg
from datagen import make_csv
from rethink_tl.data import build_data, dataset_labels, plan
from rethink_tl.errors import UserError


@pytest.fixture(scope="module")
def csv(tmp_path_factory):
    return make_csv(tmp_path_factory.mktemp("csv"))


def data_cfg(path, *extra):
    return compose_cfg(["data=csv", f"data.csv={path}", "data.image_size=24", *extra]).data


def sizes(data):
    return [len(s) for s in data.splits().values()]


def test_label_columns_found_without_reading_images(csv, tmp_path):
    # Columns holding only 1/0/-1/blank are labels; age and sex are not.
    assert dataset_labels(data_cfg(csv)) == ["covid", "opacity"]
    assert dataset_labels(data_cfg(csv, "data.labels=[opacity]")) == ["opacity"]
    with pytest.raises(UserError, match="has no column 'fever'.*asked for by data.labels"):
        dataset_labels(data_cfg(csv, "data.labels=[covid,fever]"))
    only_meta = tmp_path / "meta.csv"
    only_meta.write_text("path,age\na.png,40\n")
    with pytest.raises(UserError, match="has no label column"):
        dataset_labels(data_cfg(only_meta))


def test_a_label_column_with_a_typo_is_refused_not_dropped(csv, tmp_path):
    table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    table.loc[6, "opacity"] = "2"  # one of its 23 filled cells: a typo in a label column, not a column of other data
    typo = tmp_path / "typo.csv"
    table.to_csv(typo, index=False)
    with pytest.raises(UserError, match=r"column 'opacity' holds 1/0/-1/blank in 22 of its 23 filled rows but not in "
                                        r"1: row 7 \(line 8\) opacity='2'; correct those cells, or name the label "
                                        r"columns with data.labels"):
        dataset_labels(data_cfg(typo))
    assert dataset_labels(data_cfg(typo, "data.labels=[covid]")) == ["covid"]  # left out when asked to


def test_prospective_split(csv):
    data = build_data(data_cfg(csv, "data.cutoff_date=2020-03-21"))
    # Images 0..19 are dated before 2020-03-21 (patients p00..p09); val = ceil(0.2 * 10) = 2
    # of those patients; images 20..29 are the test split.
    assert sizes(data) == [16, 4, 10]
    table = pd.read_csv(csv).set_index("path")
    dates = {name: pd.to_datetime(table.loc[s.ids, "date"]) for name, s in data.splits().items()}
    assert (dates["train"] < "2020-03-21").all() and (dates["val"] < "2020-03-21").all()
    assert (dates["test"] >= "2020-03-21").all()
    pats = {name: set(table.loc[s.ids, "patient_id"]) for name, s in data.splits().items()}
    assert len(pats["val"]) == 2 and not pats["train"] & pats["val"]
    assert data.test.ids == [f"img/{i:03d}.{'jpg' if i % 3 == 2 else 'png'}" for i in range(20, 30)]


def test_random_patient_split(csv):
    data = build_data(data_cfg(csv))
    # 15 patients of 2 images: ceil(0.2 * 15) = 3 for test, ceil(0.2 * 12) = 3 for val, 9 train.
    assert sizes(data) == [18, 6, 6]
    table = pd.read_csv(csv).set_index("path")
    pats = [set(table.loc[s.ids, "patient_id"]) for s in data.splits().values()]
    assert not (pats[0] & pats[1]) and not (pats[0] & pats[2]) and not (pats[1] & pats[2])
    # ceil(0.4 * 15) = 6 test patients, ceil(0.1 * 9) = 1 val patient.
    assert sizes(build_data(data_cfg(csv, "data.val_share=0.1", "data.test_share=0.4"))) == [16, 2, 12]


def test_no_patient_column_means_one_patient_per_image(tmp_path):
    path = make_csv(tmp_path)
    pd.read_csv(path).drop(columns="patient_id").to_csv(path, index=False)
    assert sizes(build_data(data_cfg(path))) == [19, 5, 6]  # 6 = ceil(0.2 * 30), 5 = ceil(0.2 * 24)


def test_labels_and_uncertainty(csv):
    table = pd.read_csv(csv, keep_default_na=False).set_index("path")
    for policy in ("ones", "zeros", "ignore"):
        data = build_data(data_cfg(csv, f"data.uncertain={policy}"))
        raw = table.loc[data.train.ids, ["covid", "opacity"]].astype(str).to_numpy()
        y, m = data.train.labels.numpy(), data.train.mask.numpy()
        np.testing.assert_array_equal(y[:, 0], raw[:, 0].astype(float))
        unc = raw[:, 1] == "-1.0"
        assert unc.any() and (y[raw[:, 1] == "1.0", 1] == 1).all() and (y[raw[:, 1] == "", 1] == 0).all()
        assert (y[unc, 1] == (1 if policy == "ones" else 0)).all()
        assert (~m[unc, 1]).all() if policy == "ignore" else m.all()


def test_mixed_formats_sizes_and_bit_depths(tmp_path):
    grey = build_data(data_cfg(make_csv(tmp_path / "grey")))
    assert grey.train.images.shape[1:] == (1, 24, 24)
    # 16-bit images are stretched over the 8-bit range like the others, not left dark.
    png16 = [k for k, i in enumerate(grey.train.ids) if int(i[4:7]) % 3 == 1]
    assert png16 and all(grey.train.images[k].max() > 200 for k in png16)
    colour = build_data(data_cfg(make_csv(tmp_path / "rgb", kinds=("png8", "rgb", "rgbjpeg", "png16"))))
    assert colour.train.images.shape[1:] == (3, 24, 24)
    forced = build_data(data_cfg(tmp_path / "rgb" / "images.csv", "data.channels=1"))
    assert forced.train.images.shape[1:] == (1, 24, 24)


def test_absolute_paths_and_a_separate_root(tmp_path):
    path = make_csv(tmp_path / "a", n=10)
    table = pd.read_csv(path)
    table["path"] = [str(tmp_path / "a" / p) for p in table["path"]]
    elsewhere = tmp_path / "lists" / "abs.csv"
    elsewhere.parent.mkdir()
    table.to_csv(elsewhere, index=False)
    assert sum(sizes(build_data(data_cfg(elsewhere)))) == 10
    pd.read_csv(path).to_csv(elsewhere, index=False)  # relative again, but to another folder
    assert sum(sizes(build_data(data_cfg(elsewhere, f"data.root={tmp_path / 'a'}")))) == 10


def test_bad_tables(tmp_path):
    path = make_csv(tmp_path, n=10)
    table = pd.read_csv(path, keep_default_na=False)
    table.loc[3, "covid"] = 2
    table.loc[7, "opacity"] = "yes"
    table.to_csv(tmp_path / "bad_values.csv", index=False)
    with pytest.raises(UserError, match=r"2 are not: row 4 \(line 5\) covid='2'; row 8 \(line 9\) opacity='yes'"):
        build_data(data_cfg(tmp_path / "bad_values.csv", "data.labels=[covid,opacity]"))
    with pytest.raises(UserError, match="no column 'when'.*needed by data.cutoff_date"):
        build_data(data_cfg(path, "data.cutoff_date=2020-03-05", "data.date_column=when"))
    with pytest.raises(UserError, match="data.cutoff_date=someday is not a date"):
        build_data(data_cfg(path, "data.cutoff_date=someday"))
    empty = r"the test split is empty \(train 8, val 2, test 0\).*2020-03-01 to 2020-03-10"
    with pytest.raises(UserError, match=empty):
        build_data(data_cfg(path, "data.cutoff_date=2021-01-01"))
    table = pd.read_csv(path, keep_default_na=False)
    table.loc[2, "date"] = "not yet"
    table.to_csv(tmp_path / "bad_date.csv", index=False)
    with pytest.raises(UserError, match=r"1 rows have no readable 'date' \(dates must be YYYY-MM-DD.*: row 3 \(line 4\)"):
        build_data(data_cfg(tmp_path / "bad_date.csv", "data.cutoff_date=2020-03-05"))
    # A day-first date is refused, not read month-first: 03/07/2020 would land on either side of a cutoff.
    table.loc[2, "date"] = "03/07/2020"
    table.to_csv(tmp_path / "dmy.csv", index=False)
    with pytest.raises(UserError, match=r"1 rows have no readable 'date'.*row 3 \(line 4\) date='03/07/2020'"):
        build_data(data_cfg(tmp_path / "dmy.csv", "data.cutoff_date=2020-03-05"))
    with pytest.raises(UserError, match="no column 'file'"):
        build_data(data_cfg(path, "data.path_column=file"))
    with pytest.raises(UserError, match="data.csv is not set"):
        build_data(compose_cfg(["data=csv"]).data)


def patients(csv, data):
    table = pd.read_csv(csv).set_index("path")
    return {name: set(table.loc[s.ids, "patient_id"]) for name, s in data.splits().items()}


def test_split_by_image_is_grouping_by_row(csv, tmp_path):
    by_image = build_data(data_cfg(csv, "data.split_by=image"))
    # Exactly the split of the same CSV without a patient column (every image its own group):
    # ceil(0.2 * 30) = 6 test images, ceil(0.2 * 24) = 5 val images.
    no_patients = tmp_path / "images.csv"
    pd.read_csv(csv).drop(columns="patient_id").to_csv(no_patients, index=False)
    assert {k: s.ids for k, s in by_image.splits().items()} == {
        k: s.ids for k, s in build_data(data_cfg(no_patients, f"data.root={csv.parent}")).splits().items()}
    assert sizes(by_image) == [19, 5, 6]
    pats = patients(csv, by_image)
    assert pats["train"] & (pats["val"] | pats["test"]) or pats["val"] & pats["test"]  # a patient on two sides
    assert by_image.split_rule == "random by image: test 0.2 of images, val 0.2 of the rest (split seed 0)"
    by_patient = build_data(data_cfg(csv))
    pats = patients(csv, by_patient)
    assert not (pats["train"] & pats["val"] or pats["train"] & pats["test"] or pats["val"] & pats["test"])
    assert by_patient.split_rule == "random by patient: test 0.2 of patients, val 0.2 of the rest (split seed 0)"


def test_split_by_image_before_a_cutoff(csv, tmp_path):
    # Test is still every image from the cutoff on; val = ceil(0.2 * 20) = 4 of the 20 earlier images,
    # chosen one by one as if there were no patient column.
    data = build_data(data_cfg(csv, "data.cutoff_date=2020-03-21", "data.split_by=image"))
    no_patients = tmp_path / "images.csv"
    pd.read_csv(csv).drop(columns="patient_id").to_csv(no_patients, index=False)
    alone = build_data(data_cfg(no_patients, f"data.root={csv.parent}", "data.cutoff_date=2020-03-21"))
    assert {k: s.ids for k, s in data.splits().items()} == {k: s.ids for k, s in alone.splits().items()}
    assert sizes(data) == [16, 4, 10]
    assert data.split_rule == ("date: train/val before 2020-03-21, test on or after (val: 0.2 of images, "
                               "split seed 0)")
    assert build_data(data_cfg(csv, "data.cutoff_date=2020-03-21")).split_rule == (
        "date: train/val before 2020-03-21, test on or after (val: 0.2 of patients, split seed 0)")


def test_plan_without_a_date_column_stops_before_any_image(tmp_path):
    path = make_csv(tmp_path, n=10)
    pd.read_csv(path).drop(columns="date").to_csv(path, index=False)
    with pytest.raises(UserError, match=r"has no column 'date' .*needed by data.cutoff_date; set data.date_column"):
        plan(data_cfg(path, "data.cutoff_date=2020-06-30"))
    with pytest.raises(UserError, match=r"has no column 'when' .*data.date_column"):
        plan(data_cfg(path, "data.cutoff_date=2020-06-30", "data.date_column=when"))


def test_plan_counts_and_balances_from_the_table_alone(csv, tmp_path):
    # The table without its images: the plan needs none.
    table = pd.read_csv(csv, keep_default_na=False)
    table.to_csv(tmp_path / "images.csv", index=False)
    text = plan(data_cfg(tmp_path / "images.csv", "data.cutoff_date=2020-03-21", "data.name=covid"))
    lines = text.splitlines()
    assert lines[0] == ("covid: date: train/val before 2020-03-21, test on or after (val: 0.2 of patients, "
                        "split seed 0)")
    # Before the cutoff: patients p00..p09 (images 0..19), covid = patient number % 2. Split seed 0 puts
    # two even (covid-negative) patients in val: val has no covid positive, which the plan shows before
    # a run would stop on it; train keeps 10 positive, 6 negative images. Opacity cycles 1 / 0 / -1 /
    # blank, U-Ones: one positive image in every pair. Test = images 20..29: covid for 22, 23, 26, 27.
    assert lines[1:] == ["  train: 16 images; balance covid 1:0.60; opacity 1:1.00",
                         "  val: 4 images; balance covid no positive; opacity 1:1.00",
                         "  test: 10 images; balance covid 1:1.50; opacity 1:1.00"]
    data = build_data(data_cfg(csv, "data.cutoff_date=2020-03-21"))
    assert [f"  {k}: {len(s)} images; balance {data.balance(k)}" for k, s in data.splits().items()] == lines[1:]
    assert all(int(p[1:]) % 2 == 0 for p in patients(csv, data)["val"])
    # A training fraction: the subset's size and the seed that drew it.
    half = plan(data_cfg(tmp_path / "images.csv", "data.cutoff_date=2020-03-21", "data.fraction=0.5",
                         "data.subset_seed=3")).splitlines()
    assert half[1].startswith("  train: 8 images (data.fraction=0.5 of 16: subset seed 3, data.subset=fixed); ")
