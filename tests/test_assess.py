"""Accuracy assessment (engine/assess.py, ``geochange assess``) on the georeferenced LEVIR-CD tile: a change
mask against the label as a raster and as polygons in another CRS, object counts, exclusions, refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS

from conftest import Recorded, write_masked_raster, write_polygons
from geochange.engine.assess import assess, object_counts, raster_on
from geochange.engine.cli import main
from geochange.engine.contracts import (ASSESS_FN, ASSESS_FP, ASSESS_NOT_ASSESSED, ASSESS_TP, MASK_CHANGE,
                                        MASK_NODATA)
from geochange.engine.errors import OutputError, RasterError
from geochange.engine.grid import Grid
from geochange.engine.metrics import confusion, kappa, scores


def test_a_raster_or_polygon_reference_gives_the_figures_of_engine_metrics(levir_maps):
    mask, label = levir_maps["mask_array"], levir_maps["label_array"]
    direct = confusion(mask == MASK_CHANGE, label > 0, mask != MASK_NODATA)
    by_raster = assess(str(levir_maps["mask"]), str(levir_maps["label"]))
    (tn, fp), (fn, tp) = direct.tolist()
    assert by_raster["confusion"] == {"tn": tn, "fp": fp, "fn": fn, "tp": tp} and fp > 0 and fn > 0
    assert by_raster["global"] == pytest.approx({**scores(direct), "kappa": kappa(direct)})
    assert by_raster["pixels_assessed"] == np.count_nonzero(mask != MASK_NODATA)

    by_polygons = assess(str(levir_maps["mask"]), str(levir_maps["polygons"]))  # rasterised back from EPSG:3857
    for name, count in by_raster["confusion"].items():
        assert by_polygons["confusion"][name] == pytest.approx(count, abs=20), name  # boundary pixels at most
    assert by_polygons["global"]["f1"] == pytest.approx(by_raster["global"]["f1"], abs=1e-3)
    assert by_polygons["objects"]["reference"] == by_raster["objects"]["reference"]


def test_polygons_as_the_prediction_use_the_reference_raster_s_grid(levir_maps):
    summary = assess(str(levir_maps["polygons"]), str(levir_maps["label"]))
    c = summary["confusion"]
    assert summary["pixels_assessed"] == levir_maps["label_array"].size
    assert c["fp"] + c["fn"] <= 20 and summary["global"]["kappa"] > 0.99
    assert summary["objects"]["missed"] == summary["objects"]["false"] == 0


def test_object_counts_by_hand():
    truth = np.zeros((12, 12), bool)
    truth[1:5, 1:5] = True  # 16 px, found: the prediction below covers 12 of them, IoU 12/16
    truth[8:11, 8:11] = True  # 9 px, missed: 2 px predicted, IoU 2/9
    predicted = np.zeros_like(truth)
    predicted[1:4, 1:5] = True
    predicted[8, 8:10] = True
    predicted[1:3, 9:11] = True  # a false detection, no reference object there
    counts = object_counts(truth, predicted, 0.5)
    assert counts == {"iou_threshold": 0.5, "reference": 2, "found": 1, "missed": 1, "predicted": 3, "true": 1,
                      "false": 2}
    assert object_counts(truth, predicted, 0.8)["found"] == 0  # 12/16 = 0.75 falls short of 0.8


def test_the_area_of_interest_and_the_ignore_value_leave_pixels_out(levir_maps, tmp_path):
    label = (levir_maps["label_array"] > 0).astype(np.uint8)  # a 0/1 label with 255 where nothing is labelled
    label[:100] = 255
    with rasterio.open(levir_maps["label"]) as src:
        profile, (left, bottom, right, top) = src.profile, src.bounds
    with rasterio.open(tmp_path / "sparse.tif", "w", **profile) as dst:
        dst.write(label, 1)
    with pytest.raises(RasterError, match="give --ignore-value 255"):
        assess(str(levir_maps["mask"]), str(tmp_path / "sparse.tif"))
    sparse = assess(str(levir_maps["mask"]), str(tmp_path / "sparse.tif"), ignore_value=255)
    assert sparse["pixels_assessed"] == np.count_nonzero((label != 255) & (levir_maps["mask_array"] != MASK_NODATA))

    middle = (left + right) / 2  # the left half, in the label's CRS
    aoi = write_polygons(tmp_path / "aoi.gpkg", [{"type": "Polygon", "coordinates": [
        [(left, bottom), (middle, bottom), (middle, top), (left, top), (left, bottom)]]}], 4326)
    half = assess(str(levir_maps["mask"]), str(levir_maps["label"]), aoi=str(aoi),
                  out_raster=str(tmp_path / "agreement.tif"))
    assert half["pixels_assessed"] == 1024 * 512
    with rasterio.open(tmp_path / "agreement.tif") as src:
        agreement = src.read(1)
        assert src.nodata == ASSESS_NOT_ASSESSED and src.crs == profile["crs"]
    assert (agreement[:, 512:] == ASSESS_NOT_ASSESSED).all()
    c = half["confusion"]
    assert [np.count_nonzero(agreement == v) for v in (ASSESS_TP, ASSESS_FP, ASSESS_FN)] == [c["tp"], c["fp"], c["fn"]]


def test_two_polygon_maps_are_refused_with_a_reason(levir_maps):
    with pytest.raises(RasterError, match="both are polygons; give the prediction or the reference as a raster"):
        assess(str(levir_maps["polygons"]), str(levir_maps["polygons"]))


def test_maps_beyond_the_machine_s_memory_are_refused_before_they_are_read(levir_maps, tmp_path):
    """A million pixels a side (a sparse GeoTIFF, a few kB) was a numpy MemoryError for 931 GiB, as a traceback."""
    from osgeo import gdal

    huge = tmp_path / "huge.tif"
    gdal.GetDriverByName("GTiff").Create(str(huge), 10**6, 10**6, 1, gdal.GDT_Byte,
                                         ["TILED=YES", "SPARSE_OK=TRUE", "COMPRESS=ZSTD"]).FlushCache()
    with pytest.raises(RasterError, match=rf"^{huge}: 1000000x1000000 px, which assess holds whole: about 29802 GiB, "
                                          r"more than this machine's \d+ GiB; assess a part of both maps"):
        assess(str(huge), str(levir_maps["polygons"]))


def test_the_command_line_writes_json_and_the_raster_and_refuses_in_one_line(levir_maps, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["assess", "--prediction", str(levir_maps["mask"]), "--reference", str(levir_maps["polygons"]),
                 "--out-raster", str(out / "tpfpfn.tif"), "--json", str(out / "metrics.json")]) == 0
    written = json.loads((out / "metrics.json").read_text())
    assert written["reference"] == str(levir_maps["polygons"]) and written["objects"]["reference"] > 100
    assert "kappa" in capsys.readouterr().out
    with rasterio.open(out / "tpfpfn.tif") as src:
        assert src.dtypes == ("uint8",)

    assert main(["assess", "--prediction", str(tmp_path / "none.tif"), "--reference", str(levir_maps["label"])]) == 2
    error = capsys.readouterr().err
    assert error == f"geochange: error: {tmp_path / 'none.tif'}: no such file\n"


def test_an_agreement_raster_named_as_an_input_is_refused(levir_maps, tmp_path):
    """Written over the prediction, it would replace the map being assessed."""
    prediction = tmp_path / "mask.tif"
    prediction.write_bytes(levir_maps["mask"].read_bytes())
    with pytest.raises(OutputError, match=f"^{prediction}: this output is also an input of the run"):
        assess(str(prediction), str(levir_maps["polygons"]), out_raster=str(prediction))
    assert prediction.read_bytes() == levir_maps["mask"].read_bytes()


def test_a_raster_with_its_own_alpha_band_is_read_on_another_grid(tmp_path):
    """Its alpha band marks what lies outside it (GDAL refuses to add a second); a label exported from QGIS as
    RGBA, say."""
    from affine import Affine

    path = tmp_path / "rgba.tif"
    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=4, dtype="uint8", crs="EPSG:32633",
                       transform=Affine(1, 0, 500000, 0, -1, 5000000), photometric="RGB", alpha="YES") as dst:
        dst.write(np.full((4, 64, 64), 255, np.uint8))
    values, valid = raster_on(str(path), Grid(CRS.from_epsg(32633), Affine(1, 0, 500040, 0, -1, 4999990), 64, 64))
    assert valid.sum() == 24 * 54 and valid[:54, :24].all() and (values[valid] == 255).all()
    # A mask band instead (no alpha, no nodata): it, and what lies outside the raster, are masked too.
    for dtype in ("uint8", "float32"):  # a float raster: its warped VRT's alpha band is float
        values, valid = raster_on(str(write_masked_raster(tmp_path / f"masked_{dtype}.tif", dtype)),
                                  Grid(CRS.from_epsg(32633), Affine(1, 0, 500040, 0, -1, 4999990), 64, 64))
        assert valid.sum() == 10 * 54 and valid[:54, :10].all(), dtype


def test_metrics_undefined_on_the_data_are_null_in_the_json(levir_maps, tmp_path):
    """No change in either map: precision, recall and F1 are undefined; strict JSON readers refuse NaN."""
    with rasterio.open(levir_maps["mask"]) as src:
        profile = src.profile
    empty = tmp_path / "empty.tif"
    with rasterio.open(empty, "w", **profile) as dst:
        dst.write(np.zeros((profile["height"], profile["width"]), np.uint8), 1)
    out = tmp_path / "metrics.json"
    assert main(["assess", "--prediction", str(empty), "--reference", str(empty), "--json", str(out)]) == 0

    def refuse(constant):
        raise ValueError(f"{constant} in the JSON")

    written = json.loads(out.read_text(), parse_constant=refuse)
    assert written["global"]["f1"] is None and written["global"]["precision"] is None and written["global"]["oa"] == 1


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_maps_without_a_crs_are_placed_as_qgis_draws_them(tmp_path):
    """A pixel-grid mask (detect's outputs for plain images: no CRS, x the column, y minus the row) and a PNG label
    without a geotransform lie on one grid, whichever is the prediction and whatever their sizes."""
    from affine import Affine

    from geochange.engine.grid import PIXEL_TRANSFORM

    label = np.zeros((64, 64), np.uint8)
    label[4:10, 4:10] = 1
    with rasterio.open(tmp_path / "label.png", "w", driver="PNG", width=64, height=64, count=1, dtype="uint8") as dst:
        dst.write(label, 1)
    mask = np.where(label[:32, :32] == 1, MASK_CHANGE, 0).astype(np.uint8)
    with rasterio.open(tmp_path / "mask.tif", "w", driver="GTiff", width=32, height=32, count=1, dtype="uint8",
                       transform=PIXEL_TRANSFORM) as dst:
        dst.write(mask, 1)
    for prediction, reference in (("mask.tif", "label.png"), ("label.png", "mask.tif")):
        figures = assess(str(tmp_path / prediction), str(tmp_path / reference))
        assert figures["pixels_assessed"] == 32 * 32 and figures["confusion"]["tp"] == 36, prediction
    # One map without a CRS and one with: named, not "no pixel to assess" as if they lay apart.
    with rasterio.open(tmp_path / "placed.tif", "w", driver="GTiff", width=32, height=32, count=1, dtype="uint8",
                       crs="EPSG:32633", transform=Affine(1, 0, 500000, 0, -1, 5000000)) as dst:
        dst.write(mask, 1)
    with pytest.raises(RasterError, match="placed.tif: the map has a CRS while the map it is compared with has none"):
        assess(str(tmp_path / "label.png"), str(tmp_path / "placed.tif"))
    with pytest.raises(RasterError, match="label.png: the map has no CRS while the map it is compared with has one"):
        assess(str(tmp_path / "placed.tif"), str(tmp_path / "label.png"))


def test_assess_reports_its_steps(levir_maps):
    """Reading each map, the figures, the raster: QGIS's bar moves (it stood at 0 % until the end)."""
    steps = Recorded()
    assess(str(levir_maps["mask"]), str(levir_maps["label"]), progress=steps)
    assert steps.done == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_a_polygon_map_without_features_is_a_map_of_no_change(levir_maps, tmp_path):
    """detect's polygons where it found no change (an empty layer), as the prediction or the reference: every
    pixel counts as no change (before: "no polygon in the prediction (0 other features)")."""
    empty = write_polygons(tmp_path / "empty.gpkg", [], 3857)
    label = levir_maps["label_array"] > 0
    as_prediction = assess(str(empty), str(levir_maps["label"]))
    assert as_prediction["confusion"] == {"tn": int((~label).sum()), "fp": 0, "fn": int(label.sum()), "tp": 0}
    as_reference = assess(str(levir_maps["mask"]), str(empty))
    assert as_reference["confusion"]["tp"] == as_reference["confusion"]["fn"] == 0
    assert as_reference["confusion"]["fp"] > 0 and as_reference["objects"]["reference"] == 0
    # An area of interest still needs a polygon.
    with pytest.raises(RasterError, match="no polygon in the area of interest"):
        assess(str(levir_maps["mask"]), str(levir_maps["label"]), aoi=str(empty))


def test_a_colour_reference_or_one_whose_nodata_is_no_change_is_refused(levir_maps, tmp_path):
    """A reference with change drawn in green was scored by its red band (no change at all); one whose nodata
    value is 0 had every no-change pixel left out (precision and F1 of 1.0 whatever the prediction)."""
    with rasterio.open(levir_maps["label"]) as src:
        profile, label = src.profile, src.read(1)
    green = tmp_path / "green.tif"
    with rasterio.open(green, "w", **dict(profile, count=3)) as dst:
        dst.write(np.stack([np.zeros_like(label), label, np.zeros_like(label)]))
    with pytest.raises(RasterError, match="green.tif: a label of 3 bands whose colours differ"):
        assess(str(levir_maps["mask"]), str(green))
    grey = tmp_path / "grey.tif"
    with rasterio.open(grey, "w", **dict(profile, count=3)) as dst:
        dst.write(np.stack([label] * 3))
    assert assess(str(levir_maps["mask"]), str(grey))["confusion"] == \
        assess(str(levir_maps["mask"]), str(levir_maps["label"]))["confusion"]
    zero_nodata = tmp_path / "zero_nodata.tif"
    with rasterio.open(zero_nodata, "w", **dict(profile, nodata=0)) as dst:
        dst.write(label, 1)
    with pytest.raises(RasterError, match="zero_nodata.tif: its nodata value is 0.*gdal_edit.py -unsetnodata"):
        assess(str(levir_maps["mask"]), str(zero_nodata))


def test_a_reference_whose_nodata_is_its_change_value_is_refused(levir_maps, tmp_path):
    """A 0/255 reference saved with nodata 255 had its change pixels read as nodata: no change to find, no
    error. A 0/1 one whose nodata 255 marks unlabelled pixels is read as with --ignore-value 255."""
    with rasterio.open(levir_maps["label"]) as src:
        profile, label = src.profile, src.read(1)
    hidden = tmp_path / "hidden.tif"
    with rasterio.open(hidden, "w", **dict(profile, nodata=255)) as dst:
        dst.write(label, 1)
    with pytest.raises(RasterError, match="hidden.tif: its nodata value is 255, and none of its data marks change "
                                          "with 1: .* give --ignore-value 255$"):
        assess(str(levir_maps["mask"]), str(hidden))
    # A prediction is not asked: a 0/1 one whose nodata 255 lies outside its data, change found or not, is read.
    empty = tmp_path / "empty.tif"
    with rasterio.open(empty, "w", **dict(profile, nodata=255)) as dst:
        dst.write(np.broadcast_to(np.where(np.arange(label.shape[1]) < 100, 0, 255).astype(np.uint8), label.shape), 1)
    assert assess(str(empty), str(levir_maps["label"]))["confusion"]["tp"] == 0
    sparse = np.where(label > 0, 1, 0).astype(np.uint8)
    sparse[:50] = 255
    for name, nodata in (("sparse_nodata.tif", 255), ("sparse.tif", None)):
        with rasterio.open(tmp_path / name, "w", **dict(profile, nodata=nodata)) as dst:
            dst.write(sparse, 1)
    assert assess(str(levir_maps["mask"]), str(tmp_path / "sparse_nodata.tif"))["confusion"] == \
        assess(str(levir_maps["mask"]), str(tmp_path / "sparse.tif"), ignore_value=255)["confusion"]
