"""Feature extraction (pipeline.extract): batching, dask, full catalogue configs, validation."""

from __future__ import annotations

import inspect
from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest
from conftest import synthetic_digits

from pipeline.catalogue import FeatureConfig, FeatureConfigError, columns, load_config
from pipeline.extract import extract_features, feature_widths, features_dask
from pipeline.hog import hog_features
from pipeline.preprocess import binarize, center_of_mass_shift, deskew, median_blur
from pipeline.shape_features import moment_features, projection_profiles, topology, zoning

#: Every family and every preprocessing step (with both binarize methods), on several views.
FULL: dict[str, Any] = {
    "views": {
        "blur": [{"op": "median_blur", "size": 3}],
        "otsu": [{"op": "median_blur", "size": 5}, {"op": "binarize", "method": "otsu"}],
        "fixed": [{"op": "binarize", "method": "fixed", "threshold": 0.3}],
        "deskewed": [{"op": "deskew"}],
        "slant_only": [{"op": "deskew", "center": False}],
        "centered": [{"op": "center"}],
        "chain": [
            {"op": "median_blur"},
            {"op": "deskew"},
            {"op": "center"},
            {"op": "binarize", "method": "fixed", "threshold": 0.4},
        ],
    },
    "features": [
        {"name": "hog", "family": "hog"},
        {"name": "hog_s", "family": "hog", "view": "deskewed", "cell": 4, "bins": 12,
         "signed": True, "soft_bins": False, "spatial": "box", "norm": "l2"},
        {"name": "hog_raw", "family": "hog", "view": "blur", "cell": 5, "bins": 6, "block": 0,
         "norm": "none"},
        {"name": "px2", "family": "pixels", "view": "centered", "factor": 2},
        {"name": "px", "family": "pixels", "view": "chain", "factor": 1},
        {"name": "profiles", "family": "profiles", "view": "blur"},
        {"name": "crossings", "family": "crossings", "view": "otsu"},
        {"name": "zones", "family": "zoning", "view": "fixed", "grid": 3},
        {"name": "moments", "family": "moments", "view": "slant_only"},
        {"name": "topo", "family": "topology", "view": "otsu"},
        {"name": "topo_chain", "family": "topology", "view": "chain", "threshold": 0.5},
    ],
}  # fmt: skip
if "power" in inspect.signature(hog_features).parameters:  # optional refinement of hog
    FULL["features"].append(
        {"name": "hog_root", "family": "hog", "view": "deskewed", "power": 0.5, "eps": 0.03}
    )


@pytest.fixture(scope="module")
def full_config() -> FeatureConfig:
    return load_config(FULL)


@pytest.fixture(scope="module")
def images(mnist_like_images: np.ndarray) -> np.ndarray:
    """300 digits plus a blank and a saturated image (edge cases inside one batch)."""
    x = mnist_like_images[:298]
    return np.concatenate([x, np.zeros((1, 28, 28), np.uint8), np.full((1, 28, 28), 255, np.uint8)])


def slices(config: FeatureConfig, image_shape: tuple[int, int]) -> dict[str, slice]:
    widths = feature_widths(config, image_shape)
    out, pos = {}, 0
    for spec in config.features:
        out[spec.name] = slice(pos, pos + widths[spec.name])
        pos += widths[spec.name]
    return out


# ----------------------------------------------------------------------------- batching


def in_blocks(x: np.ndarray, config: FeatureConfig, size: int) -> np.ndarray:
    """extract_features applied to consecutive blocks of ``size`` images, concatenated."""
    return np.concatenate(
        [extract_features(x[a : a + size], config) for a in range(0, len(x), size)]
    )


@pytest.mark.parametrize("which", ["default", "full"])
def test_extract_features_is_a_finite_float32_matrix(
    images: np.ndarray, full_config: FeatureConfig, which: str
) -> None:
    config = load_config() if which == "default" else full_config
    out = extract_features(images, config)
    assert out.dtype == np.float32
    assert out.shape == (len(images), sum(feature_widths(config, (28, 28)).values()))
    assert np.isfinite(out).all()
    # Sub-batches run one after the other: the result is the blocks' results in order.
    np.testing.assert_array_equal(
        extract_features(images, config, sub_batch=64), in_blocks(images, config, 64)
    )


@pytest.mark.parametrize("which", ["default", "full"])
def test_sub_batch_size_does_not_change_the_result(
    images: np.ndarray, full_config: FeatureConfig, which: str
) -> None:
    config = load_config() if which == "default" else full_config
    x = images[:150] if which == "full" else images
    ref = extract_features(x, config, sub_batch=4096)
    for sub_batch in (1, 7, 64):
        np.testing.assert_array_equal(extract_features(x, config, sub_batch=sub_batch), ref)


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_features_dask_computes_extract_features_per_chunk(
    images: np.ndarray, full_config: FeatureConfig, chunk: int
) -> None:
    """Each dask chunk is one extract_features call (exactly its result)."""
    x = images[:120] if chunk == 1 else images
    for config in (load_config(), full_config):
        ref = in_blocks(x, config, chunk)
        lazy = features_dask(da.from_array(x, chunks=(chunk, 28, 28)), config)
        assert lazy.dtype == np.float32
        assert lazy.shape == ref.shape
        assert lazy.chunks[0] == da.from_array(x, chunks=(chunk, 28, 28)).chunks[0]
        assert lazy.chunks[1] == (ref.shape[1],)
        with dask.config.set(scheduler="threads", num_workers=2):
            got = lazy.compute()
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("chunk", [1, 7])
def test_features_dask_is_independent_of_the_chunking(
    images: np.ndarray, full_config: FeatureConfig, chunk: int
) -> None:
    x = images[:120]
    for config in (load_config(), full_config):
        ref = extract_features(x, config, sub_batch=4096)
        lazy = features_dask(da.from_array(x, chunks=(chunk, 28, 28)), config)
        np.testing.assert_array_equal(lazy.compute(scheduler="threads"), ref)


def test_features_dask_merges_chunked_image_axes(images: np.ndarray) -> None:
    config = load_config()
    x = images[:40]
    lazy = features_dask(da.from_array(x, chunks=(9, 14, 10)), config)
    np.testing.assert_array_equal(lazy.compute(scheduler="sync"), in_blocks(x, config, 9))


def test_extract_rejects_non_batches() -> None:
    with pytest.raises(ValueError, match=r"expected images of shape \(n, H, W\)"):
        extract_features(np.zeros((28, 28), np.uint8), load_config())
    with pytest.raises(ValueError, match=r"expected images of shape \(n, H, W\)"):
        features_dask(da.zeros((28, 28), dtype=np.uint8), load_config())


def test_extract_of_an_empty_batch(full_config: FeatureConfig) -> None:
    out = extract_features(np.zeros((0, 28, 28), np.uint8), full_config)
    assert out.shape == (0, sum(feature_widths(full_config, (28, 28)).values()))
    assert out.dtype == np.float32


# ----------------------------------------------------------------------------- full config


@pytest.mark.parametrize("shape", [(28, 28), (20, 32)])
def test_full_catalogue_config_runs(full_config: FeatureConfig, shape: tuple[int, int]) -> None:
    x = synthetic_digits(24, seed=5, shape=shape)
    widths = feature_widths(full_config, shape)
    assert list(widths) == [f["name"] for f in FULL["features"]]
    out = extract_features(x, full_config)
    assert out.dtype == np.float32
    assert out.shape == (24, sum(widths.values()))
    assert np.isfinite(out).all()
    H, W = shape
    assert widths["px"] == H * W
    assert widths["px2"] == (H // 2) * (W // 2)
    assert widths["profiles"] == widths["crossings"] == H + W
    assert widths["zones"] == 9
    assert widths["moments"] == 12
    assert widths["topo"] == widths["topo_chain"] == 3
    assert widths["hog_raw"] == (H // 5) * (W // 5) * 6
    # The stored layout agrees with the widths.
    layout = columns(full_config, widths, shape)
    assert layout[-1].stop == out.shape[1]


def test_each_family_is_its_kernel_on_its_view(full_config: FeatureConfig) -> None:
    """The view steps apply in order and each family sees its own view."""
    x = synthetic_digits(16, seed=6)
    out = extract_features(x, full_config)
    s = slices(full_config, (28, 28))
    np.testing.assert_array_equal(out[:, s["hog"]], hog_features(x))
    np.testing.assert_array_equal(
        out[:, s["profiles"]], projection_profiles(median_blur(x, size=3))
    )
    np.testing.assert_array_equal(
        out[:, s["zones"]], zoning(binarize(x, method="fixed", threshold=0.3), grid=3)
    )
    np.testing.assert_array_equal(out[:, s["moments"]], moment_features(deskew(x, center=False)))
    chain = binarize(
        center_of_mass_shift(deskew(median_blur(x, size=3))), method="fixed", threshold=0.4
    )
    np.testing.assert_array_equal(out[:, s["topo_chain"]], topology(chain))
    np.testing.assert_array_equal(
        out[:, s["topo"]], topology(binarize(median_blur(x, size=5), method="otsu"))
    )


def test_a_view_shared_by_families_is_computed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import catalogue

    calls = []
    original = catalogue.STEPS["deskew"]

    def counting(images: np.ndarray, **kw: Any) -> np.ndarray:
        calls.append(len(images))
        return original(images, **kw)

    monkeypatch.setitem(catalogue.STEPS, "deskew", counting)
    config = load_config(
        {"views": {"d": [{"op": "deskew"}]},
         "features": [{"family": "hog", "view": "d"}, {"family": "moments", "view": "d"}]}
    )  # fmt: skip
    feature_widths(config, (28, 28))  # its probe batch (cached) is not the point here
    calls.clear()
    extract_features(synthetic_digits(10), config)
    assert calls == [10]


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("raw", "shape", "fragment"),
    [
        ({"features": [{"name": "p3", "family": "pixels", "factor": 3}]}, (28, 28), "factor"),
        ({"features": [{"name": "p8", "family": "pixels", "factor": 8}]}, (20, 32), "factor"),
        ({"features": [{"name": "h", "family": "hog", "cell": 29}]}, (28, 28), "cell"),
        ({"features": [{"name": "h", "family": "hog", "cell": 7, "block": 5}]}, (28, 28), "block"),
        ({"features": [{"name": "h", "family": "hog", "cell": 7, "block": 3}]}, (20, 32), "block"),
        ({"features": [{"name": "h", "family": "hog", "norm": "l1"}]}, (28, 28), "norm"),
        ({"features": [{"name": "h", "family": "hog", "spatial": "gauss"}]}, (28, 28), "spatial"),
        ({"features": [{"name": "z", "family": "zoning", "grid": 21}]}, (20, 32), "grid"),
        ({"views": {"v": [{"op": "median_blur", "size": 4}]},
          "features": [{"name": "m", "family": "moments", "view": "v"}]}, (28, 28), "median"),
        ({"views": {"v": [{"op": "binarize", "method": "fixed", "threshold": 1.0}]},
          "features": [{"name": "m", "family": "moments", "view": "v"}]}, (28, 28), "threshold"),
        ({"views": {"v": [{"op": "binarize", "method": "niblack"}]},
          "features": [{"name": "m", "family": "moments", "view": "v"}]}, (28, 28), "method"),
    ],
)  # fmt: skip
def test_feature_widths_rejects_impossible_parameters(
    raw: dict[str, Any], shape: tuple[int, int], fragment: str
) -> None:
    config = load_config(raw)
    with pytest.raises(FeatureConfigError) as info:
        feature_widths(config, shape)
    message = str(info.value)
    assert "expected" in message and fragment in message
    assert config.features[0].name in message
    assert str(shape) in message


def test_the_same_parameters_can_be_fine_on_another_image_size() -> None:
    config = load_config({"features": [{"name": "p3", "family": "pixels", "factor": 3}]})
    assert feature_widths(config, (27, 30)) == {"p3": 90}


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"cell": 0}, id="cell0"),
        pytest.param({"bins": 0}, id="bins0"),
        pytest.param({"bins": 1}, id="bins1"),
        pytest.param({"bins": -3}, id="bins-negative"),
        pytest.param({"cell": -7}, id="cell-negative"),
        pytest.param({"block": -1}, id="block-negative"),
    ],
)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_feature_widths_rejects_degenerate_hog_parameters(params: dict[str, int]) -> None:
    with pytest.raises(FeatureConfigError):  # since issue 10 already by load_config's bounds
        feature_widths(
            load_config({"features": [{"name": "h", "family": "hog", **params}]}), (28, 28)
        )


def test_sub_batches_on_non_square_images(full_config: FeatureConfig) -> None:
    x = synthetic_digits(40, seed=7, shape=(20, 32))
    ref = extract_features(x, full_config, sub_batch=4096)
    for sub_batch in (1, 7, 16):
        np.testing.assert_array_equal(extract_features(x, full_config, sub_batch=sub_batch), ref)
