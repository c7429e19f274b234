"""The engine on real pairs that differ: grids, band counts, SAR in dB with NaN, tiny rasters."""
import numpy as np
import pytest
import rasterio
import torch
from osgeo import ogr
from rasterio.enums import ColorInterp
from rasterio.features import rasterize
from rasterio.windows import Window, from_bounds
from shapely import wkb

from geochange.engine.contracts import MASK_NODATA
from geochange.engine.detect import detect, prepare
from geochange.engine.errors import GeoChangeError, RasterError
from geochange.engine.grid import common_grid
from geochange.engine.inputs import check_backscatter, optical_input, sar_input
from geochange.engine.manifest import make_manifest
from geochange.engine.metrics import confusion, scores
from geochange.engine.models import create
from geochange.engine.options import DetectOptions
from geochange.engine.package import load_package, save_package
from geochange.engine.predictor import Predictor


def outputs(folder, vector="gpkg"):
    return {"probability": folder / "p.tif", "mask": folder / "m.tif", "polygons": folder / f"c.{vector}"}


def package(path, architecture="tinycd", inputs=None, **kwargs):
    torch.manual_seed(0)
    model = create(architecture, **kwargs).eval()
    return save_package(model, make_manifest(architecture, kwargs, inputs=inputs), path)


def polygons_of(path):
    source = ogr.Open(str(path))
    return [wkb.loads(bytes(f.GetGeometryRef().ExportToWkb())) for f in source.GetLayer()]


def test_reprojected_shifted_pair_is_aligned_on_the_pre_grid(tinycd_package, shared_data, tmp_path):
    tile = shared_data / "levir_tile_georef"
    messages = []

    class Log:
        def __getattr__(self, name):
            from geochange.engine.progress import Progress
            return getattr(Progress(), name)

        def log(self, message):
            messages.append(message)

    result = detect(tile / "pre.tif", tile / "post_utm14n_0.6m_shifted.tif", tinycd_package,
                    **outputs(tmp_path, "geojson"), device="cpu", progress=Log())
    with rasterio.open(result.mask) as m, rasterio.open(tile / "label.tif") as label, \
            rasterio.open(tile / "pre.tif") as pre:
        assert m.crs == pre.crs and m.res == pre.res
        window = from_bounds(*m.bounds, transform=label.transform).round_offsets().round_lengths()
        assert (window.col_off, window.row_off) == (0, 53)  # on the pre image's lattice, no resampling
        truth = label.read(1, window=window) > 0
        mask = m.read(1)
    valid = mask != MASK_NODATA
    assert 0.95 < valid.mean() < 1.0  # the rotated UTM footprint leaves invalid corners
    assert scores(confusion(mask == 255, truth, valid))["f1"] >= 0.90
    assert any("windows" in line for line in messages)


def test_post_grid_option_and_small_overlap_warning(tinycd_package, shared_data, tmp_path):
    tile = shared_data / "levir_tile_georef"
    result = detect(tile / "pre.tif", tile / "post_utm14n_0.6m_shifted.tif", tinycd_package,
                    **outputs(tmp_path), device="cpu", grid="post", tile=256, overlap=32)
    with rasterio.open(result.probability) as p:
        assert p.crs.to_epsg() == 32614 and p.res == pytest.approx((0.6, 0.6))
        assert p.is_tiled and p.overviews(1) and p.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
    # A corner of the pre image: all of it lies in the post image, 8.6 % of the post image in it.
    with rasterio.open(tile / "pre.tif") as src:
        window = Window(0, 0, 300, 300)
        profile = dict(src.profile, width=300, height=300, transform=src.window_transform(window))
        with rasterio.open(tmp_path / "corner.tif", "w", **profile) as dst:
            dst.write(src.read(window=window))
    logged = []
    with rasterio.open(tmp_path / "corner.tif") as pre, rasterio.open(tile / "post.tif") as post:
        common_grid(pre, post, warn=logged.append)
        given = common_grid(pre, post, crs="EPSG:32614", resolution=1.0)
    assert logged == ["only 8.6 % of the post image overlaps the other date"]
    assert given.crs.to_epsg() == 32614 and (given.transform.a, -given.transform.e) == (1.0, 1.0)
    # 300 px of 5.36e-6 degrees at 30.2 N: 155 m east-west, 179 m north-south.
    assert (given.width, given.height) in [(w, h) for w in (154, 155, 156) for h in (178, 179, 180)]


def test_sar_in_db_with_nan_and_13_band_optical(shared_data, tmp_path):
    floods = shared_data / "sen1floods11"
    m2cd = package(tmp_path / "m2cd.safetensors", "m2cd_mit_b0",
                   inputs={"pre": optical_input(3, scale=10000.0, dtype="int16"), "post": sar_input(3)})
    # This chip has no NaN: a copy gets a NaN swath (as at a SAR scene's edge) in every band.
    with rasterio.open(floods / "S1_vv_vh_db.tif") as src:
        profile, data = src.profile, src.read()
    assert profile["nodata"] != profile["nodata"]  # the file declares NaN as nodata
    cols = np.arange(data.shape[2])
    nan = cols[None, :] < 140 + 0.3 * np.arange(data.shape[1])[:, None]
    data[:, nan] = np.nan
    with rasterio.open(tmp_path / "s1_edge.tif", "w", **profile) as dst:
        dst.write(data)
    result = detect(floods / "S2_l1c_13band.tif", tmp_path / "s1_edge.tif", m2cd, **outputs(tmp_path),
                    pre_bands=[4, 3, 2], post_bands=[1], sar_db=True, tile=256, overlap=32, device="cpu",
                    threshold=0.0)  # every valid pixel is change: polygons run right up to the nodata
    with rasterio.open(result.mask) as m:
        mask = m.read(1)
    assert (mask[nan] == MASK_NODATA).all() and (mask[~nan] != MASK_NODATA).all()
    burnt = rasterize(polygons_of(result.polygons), out_shape=mask.shape, transform=result.grid.transform)
    assert result.polygon_count == 1
    assert not (burnt.astype(bool) & nan).any()  # no polygon reaches into nodata
    assert burnt.astype(bool)[~nan].all()
    with pytest.raises(GeoChangeError, match="2 post band"):
        detect(floods / "S2_l1c_13band.tif", tmp_path / "s1_edge.tif", m2cd, **outputs(tmp_path / "x"),
               pre_bands=[4, 3, 2], post_bands=[1, 2])


def test_sar_db_and_linear_inputs_give_the_same_model_input():
    spec = sar_input(3)
    db = torch.tensor([[[[-20.0, -10.0], [0.0, -30.0]]]])
    from geochange.engine.inputs import normalise
    assert torch.allclose(normalise(db, spec, sar_db=True), normalise(10 ** (db / 10), spec), atol=1e-5)
    with pytest.raises(RasterError, match=r"^the post image holds backscatter in dB, not linear power: 100% of its "
                                          r"values are below -1; say so \(--sar-db"):
        check_backscatter(db.numpy(), spec, False, "the post image")  # read as power: every pixel would map to 0
    check_backscatter(db.numpy(), spec, True, "the post image")
    noisy = np.array([[[[0.05, -0.001, 0.2, 0.0]]]], np.float32)  # power after thermal-noise removal: a negative
    check_backscatter(noisy, spec, False, "the post image")  # ... read as the dB window's floor, as before
    grey = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    x = normalise(grey, spec)
    assert x.shape == (1, 3, 1, 2)  # replicated to three channels
    assert torch.allclose(x[0, :, 0, 1], (1 - torch.tensor(spec["mean"])) / torch.tensor(spec["std"]))


def test_uint8_uint16_and_float_reflectance_give_the_same_model_input():
    from geochange.engine.inputs import normalise
    spec = optical_input(3)  # trained on 8-bit images
    reflectance = np.arange(6).reshape(1, 1, 2, 3).repeat(3, axis=1) / 5  # exact in every type below
    as_uint8 = normalise((reflectance * 255).astype(np.uint8), spec)
    torch.testing.assert_close(normalise((reflectance * 10000).astype(np.uint16), spec), as_uint8)
    torch.testing.assert_close(normalise(reflectance.astype(np.float32), spec), as_uint8)
    # 12-bit data, scaled as the user says (--pre-scale 4095)
    torch.testing.assert_close(normalise((reflectance * 4095).astype(np.uint16), spec, scale=4095), as_uint8)


def test_six_and_four_band_rasters(shared_data, tmp_path):
    six = package(tmp_path / "six.safetensors", inputs={"pre": optical_input(6), "post": optical_input(6)},
                  in_chans=6)
    landsat = shared_data / "landsat_taizhou"
    result = detect(landsat / "pre_2000.tif", landsat / "post_2003.tif", six, **outputs(tmp_path / "l"),
                    tile=256, overlap=32, device="cpu")
    with rasterio.open(result.mask) as m:
        assert m.shape == (400, 400) and m.crs.to_epsg() == 32651
    haiti = shared_data / "haiti_s2"
    rgb = package(tmp_path / "rgb.safetensors")
    with pytest.raises(GeoChangeError, match="4 band.*--pre-bands"):
        detect(haiti / "pre_2018.tif", haiti / "post_2019.tif", rgb, **outputs(tmp_path / "h"))
    detect(haiti / "pre_2018.tif", haiti / "post_2019.tif", rgb, **outputs(tmp_path / "h"), pre_bands=[1, 2, 3],
           post_bands=[1, 2, 3], tile=256, overlap=32, device="cpu")
    # The model gets the bands in the order given.
    windows = []
    for pre_bands, post_bands in (([1, 2, 3], [1, 2, 4]), ([3, 2, 1], [4, 1, 2])):
        read = prepare(haiti / "pre_2018.tif", haiti / "post_2019.tif", rgb,
                       DetectOptions(pre_bands=pre_bands, post_bands=post_bands, device="cpu")).reader()
        windows.append(read(Window(30, 40, 64, 64))[:2])
        read.close()
    (pre, post), (pre_321, post_412) = windows
    assert pre.std() > 0 and not np.array_equal(pre[0], pre[2])
    np.testing.assert_array_equal(pre_321, pre[::-1])
    np.testing.assert_array_equal(post_412, post[[2, 0, 1]])


def test_raster_smaller_than_a_tile(shared_data, tmp_path):
    ndvi = shared_data / "ndvi_slovenia"
    one_band = {"pre": optical_input(1, scale=1.0, dtype="float32"), "post": optical_input(1, scale=1.0,
                                                                                           dtype="float32")}
    model = package(tmp_path / "ndvi.safetensors", inputs=one_band, in_chans=1)
    result = detect(ndvi / "ndvi_2015-08-30.tif", ndvi / "ndvi_2017-08-24.tif", model, **outputs(tmp_path),
                    device="cpu", threshold=0.0)
    with rasterio.open(result.probability) as p, rasterio.open(ndvi / "ndvi_2015-08-30.tif") as src:
        assert p.shape == src.shape == (101, 100) and p.transform == src.transform
    assert result.polygon_count == 1  # threshold 0: one region, whatever the windows


def test_a_region_crossing_every_band_seam_is_one_polygon(shared_data, tmp_path):
    tile = shared_data / "levir_tile_georef"
    model = package(tmp_path / "r.safetensors")
    result = detect(tile / "pre.tif", tile / "post.tif", model, **outputs(tmp_path), tile=128, overlap=16,
                    batch=8, device="cpu", threshold=0.0)
    assert result.polygon_count == 1
    (polygon,) = polygons_of(result.polygons)
    with rasterio.open(tile / "pre.tif") as pre:
        assert polygon.area == pytest.approx((pre.bounds.right - pre.bounds.left)
                                             * (pre.bounds.top - pre.bounds.bottom))


def test_cuda_out_of_memory_halves_the_batch_and_retries(tmp_path):
    loaded = load_package(package(tmp_path / "m.safetensors"))
    forward = loaded.model.forward
    failures = []

    def fake_out_of_memory_once(pre, post):
        if len(pre) > 2 and not failures:
            failures.append(len(pre))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (raised by the test)")
        return forward(pre, post)

    loaded.model.forward = fake_out_of_memory_once
    logged = []
    predictor = Predictor(loaded, "cpu", log=logged.append)
    x = np.random.default_rng(0).integers(0, 255, (4, 3, 64, 64), dtype=np.uint8)
    probs = predictor(x, x[::-1].copy())
    assert probs.shape == (4, 64, 64) and failures == [4] and predictor.max_batch == 2
    assert "batch lowered to 2" in logged[0]
    reference = Predictor(load_package(tmp_path / "m.safetensors"), "cpu")(x, x[::-1].copy())
    np.testing.assert_allclose(probs, reference, atol=1e-6)


def test_tta_averages_scales_and_flips_of_images_in_their_own_type(tinycd_package, shared_data):
    """TTA (the trainer's test and Open-CD's): each scale's resized copy, as is and flipped left-right,
    predicted and resized back, averaged. Resized copies stay uint8: a float copy would be scaled as
    reflectance (1.0, not 255) and every pixel called unchanged (a bug that once made TTA figures those
    of "no change")."""
    import torch
    import torch.nn.functional as F

    from geochange.engine.predictor import resized
    from geochange.engine.rasters import read_image
    a = read_image(shared_data / "levir_cd" / "A" / "test_2_0000_0000.png")[None]
    b = read_image(shared_data / "levir_cd" / "B" / "test_2_0000_0000.png")[None]
    label = read_image(shared_data / "levir_cd" / "label" / "test_2_0000_0000.png")[0] > 0
    assert resized(a, (192, 192)).dtype == np.uint8
    predictor = Predictor(load_package(tinycd_package), "cpu")
    plain = predictor(a, b)
    tta = Predictor(load_package(tinycd_package), "cpu", tta={"scales": [0.75, 1.0, 1.25], "flip": True})(a, b)
    one = Predictor(load_package(tinycd_package), "cpu", tta={"scales": [1.0], "flip": False})(a, b)
    assert np.array_equal(one, plain) and not np.array_equal(plain, tta)
    passes = []
    for scale in (0.75, 1.0, 1.25):
        size = (round(256 * scale),) * 2
        small_a, small_b = resized(a, size), resized(b, size)
        for flip in (False, True):
            x_a, x_b = (np.ascontiguousarray(x[..., ::-1]) if flip else x for x in (small_a, small_b))
            prob = predictor(x_a, x_b)
            prob = np.ascontiguousarray(prob[..., ::-1]) if flip else prob
            passes.append(F.interpolate(torch.from_numpy(prob)[:, None], size=(256, 256), mode="bilinear",
                                        align_corners=False)[:, 0].numpy())
    np.testing.assert_allclose(tta, np.mean(passes, axis=0), atol=1e-5)
    changed = tta[0] > 0.5
    assert label.any() and (changed & label).sum() / (changed | label).sum() > 0.7  # IoU of the change class
    with pytest.raises(GeoChangeError, match="test-time augmentation must be scales"):
        Predictor(load_package(tinycd_package), "cpu", tta={"scales": [0], "flip": True})
    with pytest.raises(GeoChangeError, match="test-time augmentation must be scales"):
        Predictor(load_package(tinycd_package), "cpu", tta=True)


def test_optical_pre_and_sar_post_datasets_run_and_a_band_mismatch_is_named(shared_data, tmp_path, tinycd_package):
    from geochange.engine.evaluate import evaluate_folder

    m2cd = load_package(package(tmp_path / "m2cd.safetensors", "m2cd_mit_b0",
                                inputs={"pre": optical_input(3), "post": sar_input(3)}))
    flood = tmp_path / "flood"  # one folder per pair there: linked here as one A/ B/ label/ dataset
    for pair in sorted((shared_data / "flood_optical_sar").iterdir()):
        for part in ("A", "B", "label"):
            (flood / part).mkdir(parents=True, exist_ok=True)
            (flood / part / f"{pair.name}.png").symlink_to(pair / f"{part}.png")
    for root, images in ((shared_data / "ombria", 20), (flood, 2)):  # 256 px tiles; 990 x 554 px, tiled
        summary = evaluate_folder(m2cd, root, device="cpu")
        c = summary["confusion"]
        assert summary["images"] == images and c["tp"] + c["fn"] > 0 and np.isfinite(summary["global"]["mIoU"])
    # One grey SAR band where the model wants three optical ones: named, not broadcast.
    with pytest.raises(GeoChangeError, match=r"\{A,B\}/test_\d+\.png: the post image has 1 band\(s\), the model "
                                             r"expects 3 \(optical\)"):
        evaluate_folder(load_package(tinycd_package), shared_data / "ombria", device="cpu")


def test_an_optical_image_where_the_model_takes_sar_is_not_told_to_pick_a_band_of_it():
    """An RGB after-image for the zoo's flood models (optical before, SAR after) was told 'choose them with
    --post-bands', which invites one optical band read as SAR: a run that finds nothing."""
    from geochange.engine.bands import select_bands

    with pytest.raises(RasterError, match=r"post.tif: the post image has 3 band\(s\), the model expects 1 \(sar\); if "
                                          r"it is SAR, choose its band\(s\) with --post-bands \(an optical image there "
                                          r"finds no change\)"):
        select_bands(3, {"bands": 1, "modality": "sar"}, "post", None, "post.tif")


def write_rgb(path, data=None, dtype="uint8", colours=None):
    """A 64 px three-band raster in UTM (random pixels unless ``data``), its bands labelled ``colours``."""
    data = np.random.default_rng(0).integers(1, 255, (3, 64, 64)).astype(dtype) if data is None else data
    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=3, dtype=data.dtype, crs="EPSG:32614",
                       transform=rasterio.Affine(0.5, 0, 630000, 0, -0.5, 3340000)) as dst:
        dst.write(data)
        if colours:
            dst.colorinterp = colours
    return path


def test_rasters_that_are_not_one_raster_of_real_pixels_are_named(tmp_path, random_package):
    """Complex pixels (SAR SLC) ran on their real part, silently; a GeoPackage of two raster tables was taken for a
    raster without a CRS or bands; a raster named as GDAL names it was 'no such file', without the way out."""
    from osgeo import gdal

    post = write_rgb(tmp_path / "post.tif")
    complex_pre = write_rgb(tmp_path / "slc.tif", np.ones((3, 64, 64), np.complex64))
    with pytest.raises(RasterError, match=r"slc.tif: complex pixels \(complex64\), as in single-look complex SAR"):
        prepare(complex_pre, post, random_package, DetectOptions.of({}))
    tables = tmp_path / "tables.gpkg"
    for table in ("one", "two"):
        gdal.Translate(str(tables), str(post), format="GPKG",
                       creationOptions=[f"RASTER_TABLE={table}", "APPEND_SUBDATASET=YES"])
    with pytest.raises(RasterError, match=rf"^{tables}: holds 2 rasters, not one; save the one to use as a GeoTIFF "
                                          rf"first, e.g. `gdal_translate 'GPKG:{tables}:one' raster.tif`$"):
        prepare(tables, post, random_package, DetectOptions.of({}))
    with pytest.raises(RasterError, match=rf"^GPKG:{tables}:one: no such file; GeoChange reads whole raster files"):
        prepare(f"GPKG:{tables}:one", post, random_package, DetectOptions.of({}))


def test_swapped_dates_and_bands_labelled_out_of_order_are_pointed_out(shared_data, tmp_path, random_package):
    """The flood model's SAR tile given before its optical one got 'choose them with --pre-bands', which then ran and
    found nothing; a pre raster labelled blue, green, red ran as red, green, blue, silently."""
    from conftest import Recorded
    from geochange.engine.zoo import zoo_path

    optical, sar = shared_data / "ombria" / "A" / "test_0013.png", shared_data / "ombria" / "B" / "test_0013.png"
    with pytest.raises(RasterError, match=r"^test_0013.png has 1 band\(s\) and test_0013.png 3: the model takes 3 "
                                          r"\(optical\) before and 1 \(sar\) after; are the dates swapped\?"):
        prepare(sar, optical, zoo_path("m2cd_mit_b0_flood"), DetectOptions.of({}))

    rgb = write_rgb(tmp_path / "rgb.tif", colours=[ColorInterp.red, ColorInterp.green, ColorInterp.blue])
    bgr = write_rgb(tmp_path / "bgr.tif", colours=[ColorInterp.blue, ColorInterp.green, ColorInterp.red])
    said = Recorded()
    prepare(bgr, rgb, random_package, DetectOptions.of({}), progress=said)
    assert [line for line in said.lines if "labelled" in line] == [
        "bgr.tif: the pre bands read (1,2,3) are labelled blue, green, red in the file; a model of red, green, blue "
        "(the zoo's, the papers') takes them in that order with --pre-bands 3,2,1"]
    said = Recorded()
    prepare(bgr, rgb, random_package, DetectOptions.of({"pre_bands": (3, 2, 1)}), progress=said)
    assert not [line for line in said.lines if "labelled" in line]


def test_a_shapefile_keeps_file_names_beyond_latin_1(tmp_path, random_package):
    """Its fields were written in Latin-1, the dates' names as question marks, with no .cpg to say so."""
    pre = write_rgb(tmp_path / "до_北京.tif")
    post = write_rgb(tmp_path / "post.tif", np.random.default_rng(1).integers(1, 255, (3, 64, 64)).astype("uint8"))
    result = detect(pre, post, random_package, **outputs(tmp_path, "shp"), threshold=0.0)
    assert result.polygon_count >= 1
    source = ogr.Open(str(tmp_path / "c.shp"))  # kept: its layer dies with it
    assert {feature.GetField("pre") for feature in source.GetLayer()} == {"до_北京.tif"}
    assert (tmp_path / "c.cpg").read_text().strip() == "UTF-8"


def test_import_weights_says_a_package_is_one_already(random_package, tmp_path):
    """It tried to map the package's keys as the authors' and printed two lists of hundreds of keys."""
    from geochange.engine.errors import OptionError
    from geochange.engine.importers import import_weights

    with pytest.raises(OptionError, match=f"^{random_package}: already a GeoChange package; detect, evaluate and the "
                                          "trainer take it as it is$"):
        import_weights("tinycd", random_package, tmp_path / "again.safetensors")
    assert not list(tmp_path.iterdir())
