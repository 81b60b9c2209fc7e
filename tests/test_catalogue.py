"""Feature configurations (pipeline.catalogue): normalisation, hashing, errors, column layout."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.catalogue import (
    BASE_VIEW,
    DEFAULT_CONFIG,
    FAMILIES,
    STEPS,
    FeatureConfig,
    FeatureConfigError,
    columns,
    describe,
    load_config,
)
from pipeline.errors import InputError
from pipeline.shape_features import MOMENT_NAMES, TOPOLOGY_NAMES

SMALL = {
    "views": {"binary": [{"op": "median_blur", "size": 3}, {"op": "binarize", "method": "otsu"}]},
    "features": [
        {"name": "hog_c7", "family": "hog", "view": "binary", "cell": 7, "bins": 9},
        {"name": "moments", "family": "moments"},
        {"name": "zones", "family": "zoning", "grid": 3},
        {"name": "px", "family": "pixels", "factor": 4},
    ],
}


# ----------------------------------------------------------------------------- default + hash


def test_default_config_loads_and_has_a_stable_hash() -> None:
    a, b = load_config(None), load_config()
    assert isinstance(a, FeatureConfig)
    assert a == b
    assert a.hash == b.hash
    assert len(a.hash) == 64 and int(a.hash, 16) >= 0
    # The default is the DEFAULT_CONFIG dict, normalised; loading that dict gives the same.
    assert load_config(copy.deepcopy(DEFAULT_CONFIG)).hash == a.hash
    # And it round-trips through its own normal form.
    assert load_config(a.to_dict()) == a
    assert load_config(a.to_dict()).hash == a.hash


def test_default_config_is_not_mutated_by_loading() -> None:
    before = copy.deepcopy(DEFAULT_CONFIG)
    load_config(None)
    load_config(DEFAULT_CONFIG)
    assert before == DEFAULT_CONFIG


def test_hash_of_the_same_dict_twice_is_equal() -> None:
    assert load_config(copy.deepcopy(SMALL)).hash == load_config(copy.deepcopy(SMALL)).hash


def test_hash_ignores_dict_key_order() -> None:
    def reverse(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: reverse(obj[k]) for k in reversed(list(obj))}
        if isinstance(obj, list):
            return [reverse(v) for v in obj]
        return obj

    shuffled = reverse(SMALL)
    assert list(shuffled) != list(SMALL)
    assert load_config(shuffled).hash == load_config(SMALL).hash


def test_explicit_defaults_hash_like_omitted_ones() -> None:
    base = load_config({"features": [{"family": "hog", "cell": 7}]})
    explicit = load_config(
        {"features": [{"family": "hog", "cell": 7, "view": BASE_VIEW, "name": "hog_gray"}]}
    )
    assert explicit.hash == base.hash
    # Filling in every default parameter of every family and step changes nothing either.
    filled = load_config(base.to_dict())
    assert filled.hash == base.hash
    step_default = load_config(
        {"views": {"v": [{"op": "median_blur"}]}, "features": [{"family": "pixels", "view": "v"}]}
    )
    step_explicit = load_config(
        {"views": {"v": [{"op": "median_blur", "size": 3}]},
         "features": [{"family": "pixels", "view": "v", "factor": 2}]}
    )  # fmt: skip
    assert step_default.hash == step_explicit.hash


def test_an_int_for_a_float_parameter_is_the_same_value() -> None:
    a = load_config({"features": [{"family": "crossings", "threshold": 1}]})
    b = load_config({"features": [{"family": "crossings", "threshold": 1.0}]})
    assert a.hash == b.hash
    assert a.features[0].kwargs["threshold"] == 1.0
    assert isinstance(a.features[0].kwargs["threshold"], float)


@pytest.mark.parametrize(
    "change",
    [
        lambda c: c["features"][0].update(bins=12),
        lambda c: c["features"][1].update(name="moments2"),
        lambda c: c["views"]["binary"][1].update(method="fixed"),
        lambda c: c["features"].reverse(),
        lambda c: c["views"]["binary"].reverse(),
        lambda c: c["features"].pop(),
    ],
)
def test_hash_changes_with_the_configuration(change: Any) -> None:
    other = copy.deepcopy(SMALL)
    change(other)
    assert load_config(other).hash != load_config(SMALL).hash


def test_normal_form_fills_every_parameter() -> None:
    config = load_config(SMALL)
    d = config.to_dict()
    hog = d["features"][0]
    assert set(hog) >= {"name", "family", "view", "cell", "bins", "signed", "block"}
    assert d["features"][1] == {"name": "moments", "family": "moments", "view": BASE_VIEW}
    assert d["views"]["binary"][0] == {"op": "median_blur", "size": 3}
    assert d["views"]["binary"][1]["method"] == "otsu"
    assert "threshold" in d["views"]["binary"][1]
    json.dumps(d)  # plain data


def test_default_names_are_family_and_view() -> None:
    config = load_config(
        {
            "views": {"d": [{"op": "deskew"}]},
            "features": [{"family": "hog"}, {"family": "hog", "view": "d"}],
        }
    )
    assert [f.name for f in config.features] == ["hog_gray", "hog_d"]


# ----------------------------------------------------------------------------- errors


def test_reserved_view_name_is_an_error() -> None:
    with pytest.raises(FeatureConfigError, match="gray"):
        load_config({"views": {"gray": [{"op": "deskew"}]}, "features": [{"family": "hog"}]})


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"features": [{"family": "wavelets"}]}, "family"),
        ({"features": [{"cell": 7}]}, "family"),
        ({"views": {"v": [{"op": "sharpen"}]}, "features": [{"family": "hog"}]}, "op"),
        ({"views": {"v": [{"size": 3}]}, "features": [{"family": "hog"}]}, "op"),
        ({"features": [{"family": "hog", "cells": 7}]}, "cells"),
        ({"views": {"v": [{"op": "deskew", "centre": True}]}, "features": [{"family": "hog"}]},
         "centre"),
        ({"features": [{"family": "hog", "cell": "7"}]}, "cell"),
        ({"features": [{"family": "hog", "cell": 7.0}]}, "cell"),
        ({"features": [{"family": "hog", "signed": 1}]}, "signed"),
        ({"features": [{"family": "crossings", "threshold": "0.5"}]}, "threshold"),
        pytest.param({"features": [{"family": "crossings", "threshold": True}]}, "threshold",
                     id="bool-for-float"),
        ({"features": [{"family": "hog", "view": "deskewed"}]}, "view"),
        pytest.param({"views": {"gray": [{"op": "deskew"}]}, "features": [{"family": "hog"}]},
                     "gray", id="reserved-view-gray"),
        ({"features": []}, "feature"),
        ({"views": {"v": [{"op": "deskew"}]}}, "feature"),
        ({}, "feature"),
        ({"features": [{"family": "hog"}, {"family": "hog"}]}, "hog_gray"),
        ({"features": [{"family": "hog", "name": "x"}, {"family": "moments", "name": "x"}]}, "x"),
        ({"features": [{"family": "hog"}], "model": {}}, "model"),
    ],
)  # fmt: skip
def test_bad_configs_raise_feature_config_error(raw: dict[str, Any], fragment: str) -> None:
    with pytest.raises(FeatureConfigError) as info:
        load_config(raw)
    message = str(info.value)
    assert "expected" in message
    assert fragment in message
    assert "\n" not in message
    assert isinstance(info.value, InputError)  # jobs exit 2


@pytest.mark.parametrize(
    "raw",
    [
        {"features": {"family": "hog"}},
        {"features": ["hog"]},
        {"features": 3},
        {"views": {"v": {"op": "deskew"}}, "features": [{"family": "hog", "view": "v"}]},
        {"views": {"v": ["deskew"]}, "features": [{"family": "hog", "view": "v"}]},
        {"features": [{"family": ["hog"]}]},
    ],
    ids=["features-table", "features-strings", "features-int", "view-table", "view-strings",
         "family-list"],
)  # fmt: skip
def test_malformed_structure_raises_feature_config_error(raw: dict[str, Any]) -> None:
    with pytest.raises(FeatureConfigError, match="expected"):
        load_config(raw)


def test_toml_table_instead_of_array_of_tables(tmp_path: Path) -> None:
    path = tmp_path / "features.toml"
    path.write_text('[features]\nfamily = "hog"\n')
    with pytest.raises(FeatureConfigError, match="expected"):
        load_config(path)


def test_bad_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "features.toml"
    path.write_text("[[features]\nfamily = 'hog'\n")
    with pytest.raises(FeatureConfigError, match="expected a TOML") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_bad_json_file(tmp_path: Path) -> None:
    path = tmp_path / "features.json"
    path.write_text('{"features": [')
    with pytest.raises(FeatureConfigError, match="expected"):
        load_config(path)


def test_binary_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "features.toml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(FeatureConfigError, match="expected"):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FeatureConfigError, match="expected a readable feature config") as info:
        load_config(tmp_path / "nope.toml")
    assert "nope.toml" in str(info.value)


def test_missing_file_message_says_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(FeatureConfigError, match="expected"):
        load_config(tmp_path / "nope.toml")


# ----------------------------------------------------------------------------- files

TOML = """
[views]
deskewed = [{op = "deskew"}]
binary = [{op = "median_blur", size = 3}, {op = "binarize", method = "otsu"}]

[[features]]
name = "hog_c7"
family = "hog"
view = "deskewed"
cell = 7
bins = 9

[[features]]
name = "moments"
family = "moments"
view = "binary"
"""


def test_toml_and_json_files_load_to_the_same_config(tmp_path: Path) -> None:
    toml_path = tmp_path / "features.toml"
    toml_path.write_text(TOML)
    from_toml = load_config(toml_path)
    json_path = tmp_path / "features.json"
    json_path.write_text(json.dumps(from_toml.to_dict()))
    from_json = load_config(json_path)
    assert from_toml == from_json
    assert from_toml.hash == from_json.hash
    assert [f.name for f in from_toml.features] == ["hog_c7", "moments"]
    assert dict(from_toml.views).keys() == {"deskewed", "binary"}
    assert [op for op, _ in from_toml.view_steps("binary")] == ["median_blur", "binarize"]
    assert from_toml.view_steps(BASE_VIEW) == ()


def test_a_toml_file_without_suffix_is_toml(tmp_path: Path) -> None:
    path = tmp_path / "features.conf"
    path.write_text(TOML)
    toml_path = tmp_path / "features.toml"
    toml_path.write_text(TOML)
    assert load_config(path).hash == load_config(toml_path).hash


# ----------------------------------------------------------------------------- columns


def test_columns_layout() -> None:
    config = load_config(
        {"features": [
            {"name": "hog_c7", "family": "hog"},
            {"name": "moments", "family": "moments"},
            {"name": "zones", "family": "zoning", "grid": 2},
            {"name": "topo", "family": "topology"},
            {"name": "px", "family": "pixels", "factor": 4},
        ]}
    )  # fmt: skip
    widths = {"hog_c7": 324, "moments": len(MOMENT_NAMES), "zones": 4,
              "topo": len(TOPOLOGY_NAMES), "px": 49}  # fmt: skip
    cols = columns(config, widths, (28, 28))
    names = [c.name for c in cols]
    assert names[0] == "hog_c7"
    assert names[1 : 1 + len(MOMENT_NAMES)] == [f"moments_{n}" for n in MOMENT_NAMES]
    assert "moments_ink" in names
    assert names[1 + len(MOMENT_NAMES) : 5 + len(MOMENT_NAMES)] == [
        "zones_r0_c0", "zones_r0_c1", "zones_r1_c0", "zones_r1_c1",
    ]  # fmt: skip
    assert [n for n in names if n.startswith("topo_")] == [f"topo_{n}" for n in TOPOLOGY_NAMES]
    assert names[-1] == "px"
    # Contiguous slices covering the feature matrix in configuration order.
    pos = 0
    for c in cols:
        assert c.start == pos
        assert c.stop - c.start == (widths[c.feature] if c.layout == "list" else 1)
        assert (c.layout == "list") == (FAMILIES[_family(config, c.feature)].layout == "list")
        pos = c.stop
    assert pos == sum(widths.values())
    assert len(set(names)) == len(names)


def _family(config: FeatureConfig, name: str) -> str:
    return next(f.family for f in config.features if f.name == name)


def test_columns_reject_a_width_that_does_not_match_the_names() -> None:
    config = load_config({"features": [{"name": "m", "family": "moments"}]})
    with pytest.raises(AssertionError):
        columns(config, {"m": len(MOMENT_NAMES) + 1}, (28, 28))


def test_catalogue_describes_every_family() -> None:
    rows = describe()
    assert [r["family"] for r in rows] == list(FAMILIES)
    for r in rows:
        assert r["layout"] in ("list", "columns")
        assert r["meaning"]
    assert set(STEPS) == {"median_blur", "binarize", "deskew", "center"}


# ----------------------------------------------------------------------------- bounds: issue 10


def _numeric_parameters() -> list[tuple[str, str, str, Any]]:
    from pipeline.catalogue import _defaults

    out = []
    for kind, table in (("step", STEPS), ("family", {k: f.kernel for k, f in FAMILIES.items()})):
        for name, fn in table.items():
            for key, default in _defaults(fn).items():
                if isinstance(default, int | float) and not isinstance(default, bool):
                    out.append((kind, name, key, default))
    return out


def test_every_numeric_parameter_has_bounds_that_hold_its_default() -> None:
    from pipeline.catalogue import PARAMETER_BOUNDS

    params = _numeric_parameters()
    assert len(params) >= 10
    for kind, name, key, default in params:
        assert key in PARAMETER_BOUNDS, (kind, name, key)
        lo, hi = PARAMETER_BOUNDS[key]
        assert lo <= default and (hi == "side" or default <= hi), (kind, name, key, default)


def _hog(**params: Any) -> dict[str, Any]:
    return {"features": [{"name": "h", "family": "hog", **params}]}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize(
    "raw",
    [
        lambda v: _hog(eps=v),
        lambda v: _hog(power=v),
        lambda v: {"features": [{"family": "crossings", "threshold": v}]},
        lambda v: {
            "views": {"b": [{"op": "binarize", "method": "fixed", "threshold": v}]},
            "features": [{"family": "moments", "view": "b"}],
        },
    ],
    ids=["hog-eps", "hog-power", "crossings-threshold", "binarize-threshold"],
)
def test_non_finite_floats_are_refused(raw: Any, value: float) -> None:
    """`hog eps = nan` wrote all-NaN features (eps <= 0 is False for NaN)."""
    with pytest.raises(FeatureConfigError, match="expected a finite number for"):
        load_config(raw(value))


def test_non_finite_floats_are_refused_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    path.write_text('[[features]]\nfamily = "hog"\neps = nan\n')
    with pytest.raises(FeatureConfigError, match=r"family 'hog': expected a finite number for eps"):
        load_config(path)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_hog(bins=100_000), r"expected bins in \[2, 360\], got 100000"),
        (_hog(eps=0.0), r"expected eps in \[1e-12, 1000\], got 0.0"),
        (_hog(power=50), r"expected power in \[0.01, 4\], got 50.0"),
        (_hog(cell=0), "expected cell >= 1, got 0"),
        (_hog(block=-1), "expected block >= 0, got -1"),
        ({"features": [{"family": "zoning", "grid": 0}]}, "expected grid >= 1, got 0"),
        ({"features": [{"family": "pixels", "factor": -2}]}, "expected factor >= 1, got -2"),
        ({"features": [{"family": "topology", "threshold": 1.5}]}, r"threshold in \[0, 1\]"),
        (
            {"views": {"v": [{"op": "median_blur", "size": -3}]}, "features": [{"view": "v",
             "family": "moments"}]},
            "step 'median_blur': expected size >= 1, got -3",
        ),
    ],
)  # fmt: skip
def test_parameters_out_of_bounds_are_refused(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(FeatureConfigError, match=message):
        load_config(raw)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"views": {"blur": [{"op": "median_blur", "size": 999}]},
             "features": [{"name": "px", "family": "pixels", "view": "blur"}]},
            r"view 'blur' step 'median_blur' \(used by feature 'px'\): "
            r"expected size <= image side 28, got 999",
        ),
        (_hog(cell=29), r"feature 'h' \(hog\): expected cell <= image side 28, got 29"),
        (
            {"features": [{"name": "z", "family": "zoning", "grid": 10**15}]},
            "expected grid <= image side 28, got 1000000000000000",
        ),
    ],
)  # fmt: skip
def test_sizes_are_bounded_by_the_image_side(raw: dict[str, Any], message: str) -> None:
    """`median_blur size=999` tried to allocate 36 GiB for 50 images of 28x28."""
    from pipeline.catalogue import check_image_shape

    config = load_config(raw)
    with pytest.raises(FeatureConfigError, match=message):
        check_image_shape(config, (28, 40))
    check_image_shape(config, (2 * 10**15, 2 * 10**15))  # fine for (hypothetical) huge images


@pytest.mark.parametrize("name", ["label", "image_id", "split"])
def test_a_feature_named_like_a_fixed_column_is_refused(name: str) -> None:
    with pytest.raises(FeatureConfigError, match=f"expected a name other than .* got '{name}'"):
        load_config({"features": [{"name": name, "family": "pixels"}]})


def test_columns_that_clash_after_expansion_are_refused() -> None:
    # moments "m" makes column m_ink; a list feature named m_ink would take the same name
    config = load_config(
        {"features": [{"name": "m", "family": "moments"}, {"name": "m_ink", "family": "pixels"}]}
    )
    from pipeline.extract import feature_widths

    widths = feature_widths(config, (28, 28))
    with pytest.raises(
        FeatureConfigError, match=r"expected distinct column names, got \['m_ink'\]"
    ):
        columns(config, widths, (28, 28))
