"""``geochange:detectchanges`` in a real headless QGIS and in qgis_process.

The model is the TinyCD authors' LEVIR weights on a 256x256 crop of a LEVIR-CD test tile (EPSG:4326,
27 % changed); it runs once in-process (as the toolbox runs it, outputs loaded into the project) and
once through qgis_process, and both results are checked against the label.
"""
from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import safetensors.numpy
from affine import Affine

pytest.importorskip("qgis.core", reason="QGIS Python bindings are not installed")
from osgeo import gdal, ogr  # noqa: E402  (GDAL's bindings come with QGIS)
from qgis.core import (  # noqa: E402
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsFeature,
    QgsGeometry,
    QgsPalettedRasterRenderer,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsRasterLayer,
    QgsRectangle,
    QgsSingleBandPseudoColorRenderer,
    QgsVectorLayer,
)

from conftest import FIJI_EAST, FIJI_WEST, run_algorithm, write_constant, write_polygons  # noqa: E402
from geochange.engine.zoo import zoo_index  # noqa: E402

gdal.UseExceptions()
ogr.UseExceptions()

ALGORITHM = "geochange:detectchanges"


def outputs_in(folder: Path) -> dict:
    return {"OUTPUT_PROBABILITY": str(folder / "probability.tif"),
            "OUTPUT_MASK": str(folder / "mask.tif"),
            "OUTPUT_POLYGONS": str(folder / "changes.gpkg")}


def read_band(path) -> np.ndarray:
    dataset = gdal.Open(str(path))  # kept in a name: GDAL 3.6's bands do not keep it alive
    return dataset.GetRasterBand(1).ReadAsArray()


def change_f1(mask: np.ndarray, label: np.ndarray) -> float:
    predicted, truth = mask == 255, label == 255
    tp = np.count_nonzero(predicted & truth)
    return 2 * tp / (np.count_nonzero(predicted) + np.count_nonzero(truth))


def read_polygons(path) -> tuple[list[str], list[dict]]:
    source = ogr.Open(str(path))
    assert source.GetLayerCount() == 1
    layer = source.GetLayer(0)
    definition = layer.GetLayerDefn()
    fields = [definition.GetFieldDefn(i).GetName() for i in range(definition.GetFieldCount())]
    rows = [{"geometry": f.GetGeometryRef().Clone(), **{k: f.GetField(k) for k in fields}}
            for f in layer]
    return fields, rows


def check_outputs(outputs: dict, label_path: Path) -> None:
    """The three files exist, line up with the input grid, and say what the label says."""
    label = gdal.Open(str(label_path))
    probability = gdal.Open(outputs["OUTPUT_PROBABILITY"])
    mask = gdal.Open(outputs["OUTPUT_MASK"])
    for raster in (probability, mask):
        assert (raster.RasterXSize, raster.RasterYSize) == (label.RasterXSize, label.RasterYSize)
        assert np.allclose(raster.GetGeoTransform(), label.GetGeoTransform())
        assert raster.GetSpatialRef().GetAuthorityCode(None) == "4326"

    p = read_band(outputs["OUTPUT_PROBABILITY"])
    m = read_band(outputs["OUTPUT_MASK"])
    # Every pixel of this pair is valid, so no nodata (-1 / 127) may appear.
    assert p.dtype.kind == "f" and 0.0 <= p.min() and p.max() <= 1.0
    assert set(np.unique(m)) == {0, 255}
    assert change_f1(m, read_band(label_path)) >= 0.9

    fields, rows = read_polygons(outputs["OUTPUT_POLYGONS"])
    assert {"area_m2", "mean_prob", "max_prob"} <= set(fields)
    assert len(rows) > 0
    for row in rows:
        assert row["geometry"].GetGeometryName() in ("POLYGON", "MULTIPOLYGON")
        assert row["area_m2"] > 0
        assert 0.0 <= row["mean_prob"] <= row["max_prob"] <= 1.0
    # The polygons cover the changed pixels: compare with the pixel count times a pixel's ground area
    # (degrees to metres at the crop's latitude; the crop spans about 150 metres).
    x0, dx, _, y0, _, dy = label.GetGeoTransform()
    latitude = np.radians(y0 + dy * label.RasterYSize / 2)
    pixel_m2 = abs(dx * 111_320 * np.cos(latitude) * dy * 110_574)
    assert sum(r["area_m2"] for r in rows) == pytest.approx(np.count_nonzero(m == 255) * pixel_m2, rel=0.05)


def test_provider_lists_the_algorithm(geochange_provider):
    assert geochange_provider is not None and geochange_provider.name() == "GeoChange"
    algorithm = QgsApplication.processingRegistry().algorithmById(ALGORITHM)
    assert algorithm is not None and algorithm.displayName() == "Detect changes"
    names = {p.name() for p in algorithm.parameterDefinitions()}
    assert {"PRE", "POST", "MODEL", "PRE_BANDS", "POST_BANDS", "DEVICE", "TILE_SIZE", "OVERLAP", "BATCH_SIZE",
            "THRESHOLD", "MIN_AREA", "SIMPLIFY", "OUTPUT_PROBABILITY", "OUTPUT_MASK", "OUTPUT_POLYGONS"} <= names
    defaults = {p.name(): p.defaultValue() for p in algorithm.parameterDefinitions()}
    assert (defaults["TILE_SIZE"], defaults["OVERLAP"], defaults["BATCH_SIZE"]) == (None, 64, 4)  # no tile: the model's
    for optional in ("THRESHOLD", "PRE_BANDS", "POST_BANDS"):
        assert algorithm.parameterDefinition(optional).flags() & algorithm.parameterDefinition(optional).FlagOptional
    # Every parameter besides the inputs, the model and the outputs is one of the engine's detect options
    # (engine.options), and each of those has its parameter.
    from geochange.engine.options import DETECT, names, spec

    inputs = {p.name() for p in algorithm.parameterDefinitions() if not p.isDestination()}
    options = {spec(name).metadata["parameter"] for name in names(DETECT)}
    assert inputs - {"PRE", "POST", "MODEL", "ZOO_MODEL"} == options
    for parameter in algorithm.parameterDefinitions():  # the help explains every parameter
        assert parameter.description().split(" (")[0] in algorithm.shortHelpString()


def test_loading_the_plugin_does_not_import_torch(qgis_plugins_dir, tmp_path):
    """QGIS loads every enabled plugin at start-up: that must stay cheap and work without torch."""
    script = f"""
import os, sys
os.environ["QT_QPA_PLATFORM"] = "offscreen"
sys.path.insert(0, {str(qgis_plugins_dir)!r})
from qgis.core import QgsApplication
app = QgsApplication([], False, {str(tmp_path)!r})
app.initQgis()
import geochange
plugin = geochange.classFactory(None)  # QGIS keeps the plugin, and so its provider, alive
plugin.initProcessing()
assert QgsApplication.processingRegistry().algorithmById({ALGORITHM!r}) is not None
heavy = ("torch", "timm", "safetensors", "numpy", "rasterio", "shapely", "geochange.engine.detect",
         "geochange.engine.package")
print("HEAVY", sorted(m for m in heavy if m in sys.modules))
"""
    # QGIS's own interpreter: the plugin's host has none of the engine's packages.
    done = subprocess.run(["/usr/bin/python3", "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert "HEAVY []" in done.stdout, done.stdout + done.stderr


def test_processing_run_writes_the_three_outputs(crop_detection, levir_crop):
    results, parameters = crop_detection["results"], crop_detection["parameters"]
    for key in ("OUTPUT_PROBABILITY", "OUTPUT_MASK", "OUTPUT_POLYGONS"):
        assert Path(results[key]) == Path(parameters[key])
    assert results["POLYGON_COUNT"] == len(read_polygons(results["OUTPUT_POLYGONS"])[1])
    assert results["CHANGED_AREA_M2"] > 0
    check_outputs(results, levir_crop["label"])


def assert_styled(probability: QgsRasterLayer, mask: QgsRasterLayer, polygons: QgsVectorLayer) -> None:
    """Layers of a detection's three outputs in GeoChange's styles (``qgis_plugin.styles``)."""
    renderer = probability.renderer()
    assert isinstance(renderer, QgsSingleBandPseudoColorRenderer)
    assert (renderer.classificationMin(), renderer.classificationMax()) == (0.0, 1.0)
    ramp = renderer.shader().rasterShaderFunction().colorRampItemList()  # from transparent to opaque red
    assert [(ramp[i].value, ramp[i].color.alpha()) for i in (0, -1)] == [(0.0, 0), (1.0, 255)]
    renderer = mask.renderer()
    assert isinstance(renderer, QgsPalettedRasterRenderer)
    assert [c.value for c in renderer.classes()] == [255]  # 0 (no change) and 127 (nodata) are not drawn
    transparent = renderer.rasterTransparency().transparentSingleValuePixelList()
    assert [(p.min, p.percentTransparent) for p in transparent] == [(0.0, 100.0)]
    assert polygons.labelsEnabled() and "area_m2" in polygons.labeling().settings().fieldName
    symbol = polygons.renderer().symbol()
    assert symbol.symbolLayer(0).strokeWidth() > 0 and symbol.color().alpha() < 255
    area = polygons.editorWidgetSetup(polygons.fields().indexOf("area_m2"))
    assert (area.type(), area.config()) == ("Range", {"Precision": 0})


def opened_anew(outputs: dict) -> tuple:
    """Layers of a detection's output files as QGIS opens them anywhere later (their default styles loaded)."""
    return (QgsRasterLayer(outputs["OUTPUT_PROBABILITY"]), QgsRasterLayer(outputs["OUTPUT_MASK"]),
            QgsVectorLayer(outputs["OUTPUT_POLYGONS"]))


def test_outputs_are_loaded_styled_and_named_after_the_inputs(crop_detection):
    layers = crop_detection["layers"]
    assert set(layers) == {"pre vs post: change probability", "pre vs post: change mask",
                           "pre vs post: change polygons"}
    assert_styled(*(layers[f"pre vs post: change {name}"] for name in ("probability", "mask", "polygons")))


def test_outputs_not_loaded_open_styled_later(crop_detection, tmp_path):
    """Outputs a run leaves unloaded (a script, qgis_process, a Processing model, "Open output file" unticked) open
    styled wherever they are opened later: each file's default style is saved beside it, whole."""
    results = run_algorithm(ALGORITHM, {**crop_detection["parameters"], **outputs_in(tmp_path)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["changes.gpkg", "changes.qml", "mask.qml", "mask.tif",
                                                          "probability.qml", "probability.tif"]
    assert_styled(*opened_anew(results))

    # Polygons named as the probability they come from: the style file would be both files'; the probability's stays.
    log = Log()
    run_algorithm("geochange:vectorizechanges", {"INPUT": results["OUTPUT_PROBABILITY"],
                                                 "OUTPUT": str(tmp_path / "probability.gpkg")}, log)
    assert log.warnings == [f"{tmp_path / 'probability.gpkg'}: no style saved beside it, so QGIS "
                            f"will open it unstyled: its style file {tmp_path / 'probability.qml'} would style "
                            "probability.tif too; give the output a base name of its own"]
    probability = QgsRasterLayer(results["OUTPUT_PROBABILITY"])
    assert isinstance(probability.renderer(), QgsSingleBandPseudoColorRenderer)


def test_qgis_process_runs_the_algorithm(qgis_process, crop_detection, levir_crop, tinycd_package, tmp_path):
    listed = qgis_process("list")
    assert ALGORITHM in listed.stdout, listed.stdout + listed.stderr

    outputs = outputs_in(tmp_path)
    done = qgis_process("--json", "run", ALGORITHM, "--", f"PRE={levir_crop['pre']}",
                        f"POST={levir_crop['post']}", f"MODEL={tinycd_package}", "DEVICE=cpu",
                        "TILE_SIZE=128", "OVERLAP=32", "BATCH_SIZE=2",
                        *(f"{k}={v}" for k, v in outputs.items()))
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(done.stdout)["results"]
    for key, path in outputs.items():
        assert Path(results[key]) == Path(path)
    check_outputs(outputs, levir_crop["label"])
    assert_styled(*opened_anew(outputs))  # each file's style saved beside it, though nothing was loaded
    # Same model, same pixels: the same answer as the in-process run (batching must not matter).
    np.testing.assert_allclose(read_band(outputs["OUTPUT_PROBABILITY"]),
                               read_band(crop_detection["results"]["OUTPUT_PROBABILITY"]), atol=1e-3)


def test_engine_error_becomes_processing_exception(geochange_provider, shared_data, tinycd_package, tmp_path):
    """Pixels that cannot be read (a file cut short after its header, which QGIS opens) fail in the engine."""
    tile = shared_data / "levir_tile_georef"
    cut = tmp_path / "cut.tif"
    cut.write_bytes((tile / "pre.tif").read_bytes()[:(tile / "pre.tif").stat().st_size * 6 // 10])
    parameters = {"PRE": str(cut), "POST": str(tile / "post.tif"), "MODEL": str(tinycd_package), "DEVICE": "cpu",
                  **outputs_in(tmp_path / "out")}
    with pytest.raises(QgsProcessingException, match="cut.tif: cannot read pixels, the file is corrupt"):
        run_algorithm(ALGORITHM, parameters)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_inputs_the_model_cannot_take_are_refused_before_the_run(geochange_provider, levir_crop, shared_data,
                                                                  tinycd_package, tmp_path):
    """A pickle as the model, band counts the model does not take, dates that do not overlap, a web map, a CRS
    set in QGIS only, an unknown output CRS (QGIS takes any text), a scale of 0, an overlap not under the tile:
    QGIS's check says so before any engine starts (no engine log line), in the engine's words with QGIS's
    names."""
    far = tmp_path / "far.tif"
    with rasterio.open(levir_crop["post"]) as src:
        profile, data = src.profile, src.read()
    with rasterio.open(far, "w", **dict(profile, transform=src.transform * Affine.translation(0, 10**6))) as dst:
        dst.write(data)
    grey = tmp_path / "grey.tif"  # one band, as a SAR date
    with rasterio.open(grey, "w", **dict(profile, count=1)) as dst:
        dst.write(data[:1])
    sar = shared_data / "sen1floods11" / "S1_vv_vh_db.tif"
    pickle = shared_data / "weights" / "tinycd_levir_official.pth"
    listed = tmp_path / "listed.safetensors"  # a manifest that is a JSON list (AttributeError)
    safetensors.numpy.save_file({"w": np.zeros(1, np.float32)}, str(listed), metadata={"geochange": "[1, 2]"})
    pair = {"PRE": str(levir_crop["pre"]), "POST": str(levir_crop["post"])}
    refusals = [({**pair, "MODEL": str(pickle)}, f"{pickle}: this is a PyTorch pickle checkpoint"),
                ({**pair, "MODEL": str(listed)}, "listed.safetensors: the manifest must be a JSON object, not list"),
                ({**pair, "POST_BANDS": [3, 1]}, r"post.tif: 2 post band\(s\) chosen \(\[3, 1\]\)"),
                ({**pair, "POST_BANDS": "3,1"}, r"post.tif: 2 post band\(s\) chosen \(\[3, 1\]\)"),
                ({**pair, "PRE_BANDS": "3,x"}, "PRE_BANDS: bands must be comma-separated numbers like 3,2,1, not "
                                              "'3,x'"),
                ({**pair, "PRE": str(sar)}, r"S1_vv_vh_db.tif: the pre image has 2 band\(s\), the model expects 3 "
                                            r"\(optical\); choose them with PRE_BANDS"),
                ({**pair, "POST": str(far)}, "PRE and POST do not overlap"),
                ({**pair, "CRS": "EPSG:99999"}, "CRS: EPSG:99999 is no coordinate reference system QGIS knows"),
                ({**pair, "PRE_SCALE": 0}, "PRE_SCALE must be"),
                ({**pair, "TILE_SIZE": 128, "OVERLAP": 128}, r"OVERLAP must be in \[0, tile\) = \[0, 128\), not 128")]
    if "m2cd_mit_b0_flood" in zoo_index():  # optical before and SAR after, given the other way round
        swapped = {"PRE": str(grey), "POST": str(levir_crop["post"]), "MODEL": "", "ZOO_MODEL": "m2cd_mit_b0_flood"}
        refusals.append((swapped,
                         r"grey.tif has 1 band\(s\) and post.tif 3: the model takes 3 \(optical\) before and 1 "
                         r"\(sar\) after; are the dates swapped\?"))
    # A web map (it has a band count, which the check used to compare with the model's) and a CRS set in QGIS
    # over the file's, which the engine would not see.
    web = QgsRasterLayer("type=xyz&url=https://tile.openstreetmap.org/{z}/{x}/{y}.png&zmax=19&zmin=0", "osm", "wms")
    moved = QgsRasterLayer(str(levir_crop["post"]), "post")
    moved.setCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    assert web.isValid() and moved.isValid()
    refusals += [({**pair, "PRE": web}, "PRE: 'osm' is a wms layer; GeoChange reads raster files only"),
                 ({**pair, "POST": moved}, r"POST: the layer's CRS \(EPSG:3857\) was set in QGIS over its file's "
                                           r"\(EPSG:4326\), which GeoChange reads")]
    for changed, message in refusals:
        log = Log()
        parameters = {"MODEL": str(tinycd_package), "DEVICE": "cpu", **changed, **outputs_in(tmp_path / "out")}
        with pytest.raises(QgsProcessingException, match=message):
            run_algorithm(ALGORITHM, parameters, log)
        assert not any(line.startswith("GeoChange engine") for line in log.lines), log.lines
    assert not (tmp_path / "out").exists()
    # The modeler's "project CRS" where there is no project: no CRS given, as an empty field.
    algorithm = QgsApplication.processingRegistry().algorithmById(ALGORITHM)
    assert algorithm.checkParameterValues({**pair, "MODEL": str(tinycd_package), "CRS": "ProjectCrs",
                                           **outputs_in(tmp_path / "out")}, QgsProcessingContext()) == (True, "")


def test_an_overlap_not_under_the_model_s_tile_is_refused_before_the_run(geochange_provider, levir_crop,
                                                                        shared_data, tinycd_package, tmp_path):
    """TILE_SIZE left empty takes the package's tile (256 px here): an OVERLAP of it or more is refused by QGIS's
    check, naming the tile, before any engine starts; in Detect changes and in Detect changes in many pairs, for a
    model file and a zoo model. A model that cannot be read leaves it to the engine."""
    refused = r"OVERLAP must be under the model's tile of 256 px \(TILE_SIZE is empty\), not 256"
    pair = {"PRE": str(levir_crop["pre"]), "POST": str(levir_crop["post"]), "DEVICE": "cpu", "OVERLAP": 256,
            **outputs_in(tmp_path / "out")}
    folders = {"PRE_FOLDER": str(levir_crop["pre"].parent), "POST_FOLDER": str(levir_crop["post"].parent),
               "PATTERN": "none.tif", "DEVICE": "cpu", "OVERLAP": 256, "OUTPUT": str(tmp_path / "many")}
    models = [{"MODEL": str(tinycd_package)}] + [{"ZOO_MODEL": "tinycd_flood"}] * ("tinycd_flood" in zoo_index())
    for algorithm, parameters in (("geochange:detectchanges", pair), ("geochange:detectmanypairs", folders)):
        for model in models:
            log = Log()
            with pytest.raises(QgsProcessingException, match=refused):
                run_algorithm(algorithm, {**parameters, **model}, log)
            assert log.lines == []  # no engine ran to say anything
    assert not (tmp_path / "out").exists() and not (tmp_path / "many").exists()
    many = QgsApplication.processingRegistry().algorithmById("geochange:detectmanypairs")
    pickle = shared_data / "weights" / "tinycd_levir_official.pth"
    assert many.checkParameterValues({**folders, "MODEL": str(pickle)}, QgsProcessingContext()) == (True, "")
    # No pairs given, or band text the engine cannot read: refused there too, not once the engine runs.
    model = {"MODEL": str(tinycd_package), "OVERLAP": 32}
    assert many.checkParameterValues({"OUTPUT": str(tmp_path / "many"), **model}, QgsProcessingContext()) == \
        (False, "Give the pairs as a CSV file (PAIRS) or as two folders (PRE_FOLDER and POST_FOLDER)")
    ok, message = many.checkParameterValues({**folders, **model, "PRE_BANDS": "3,x"}, QgsProcessingContext())
    assert not ok and message.startswith("PRE_BANDS: bands must be comma-separated numbers")


def test_dates_in_degrees_a_turn_apart_are_left_to_the_engine(geochange_provider, tmp_path):
    """One place across the antimeridian, once in degrees east of 180° and once west of -180°: QGIS's check does
    not call them apart (the engine lines them up), but it still refuses dates that are apart."""
    from geochange.qgis_plugin.engine_algorithm import overlap

    east, west = (QgsRasterLayer(str(write_constant(tmp_path / f"{name}.tif", place, 1)), name)
                  for name, place in (("east", FIJI_EAST), ("west", FIJI_WEST)))
    crs, transform, width, height = FIJI_EAST
    far = QgsRasterLayer(str(write_constant(tmp_path / "far.tif", (crs, transform * Affine.translation(0, 10**4),
                                                                    width, height), 1)), "far")
    context = QgsProcessingContext()
    assert overlap(east, west, context) and overlap(west, east, context)
    assert not overlap(east, far, context)


def test_one_raster_as_both_dates_is_refused_before_the_run(geochange_provider, levir_crop, tinycd_package, tmp_path):
    """By path, as one layer, or as two layers of one file: QGIS's own check refuses it before any engine
    starts (the dialog shows it at once), and nothing is written."""
    pre, link, layer = str(levir_crop["pre"]), tmp_path / "link.tif", QgsRasterLayer(str(levir_crop["pre"]), "pre")
    link.symlink_to(pre)
    for first, second in ((pre, pre), (layer, layer), (layer, QgsRasterLayer(pre, "again")), (pre, str(link))):
        parameters = {"PRE": first, "POST": second, "MODEL": str(tinycd_package), "DEVICE": "cpu",
                      **outputs_in(tmp_path / "out")}
        with pytest.raises(QgsProcessingException, match="PRE and POST are the same raster"):
            run_algorithm(ALGORITHM, parameters)
    assert not (tmp_path / "out").exists()


class DesktopInterface:
    """What the dialog's defaults read of the QGIS desktop's ``iface``."""

    def __init__(self, active):
        self.active = active

    def activeLayer(self):  # noqa: N802 (QGIS's name)
        return self.active


def test_the_dialog_starts_pre_on_another_raster_than_post(geochange_provider, levir_crop, monkeypatch):
    """Post is the active raster (Processing's default), pre the nearest raster of another file below it in the
    layer panel, else above; the layers of one file, a vector active layer and scripts are taken care of."""
    from qgis import utils
    from qgis.core import QgsProject

    from geochange.qgis_plugin.detect_algorithm import dialog_pair

    def layers(project, *names_and_files):
        """Layers put in the layer panel in the order given, from the top."""
        made = [QgsRasterLayer(str(levir_crop[file]), name) if file else
                QgsVectorLayer("Polygon?crs=EPSG:4326", name, "memory") for name, file in names_and_files]
        for layer in reversed(made):
            project.addMapLayer(layer, False)
            project.layerTreeRoot().insertLayer(0, layer)
        return made

    def names(pair):
        return pair and [layer.name() for layer in pair]

    project = QgsProject()  # its own: the session's project holds other tests' layers
    notes, post, post_again, pre = layers(project, ("notes", None), ("post", "post"), ("post again", "post"),
                                          ("pre", "pre"))
    assert names(dialog_pair(project, post)) == ["pre", "post"]  # "post again" is post's file
    assert names(dialog_pair(project, pre)) == ["post again", "pre"]  # nothing below: above
    assert names(dialog_pair(project, notes)) == ["pre", "post"]  # no raster active: the top one
    assert names(dialog_pair(project, None)) == ["pre", "post"]
    project.removeMapLayer(pre.id())
    assert dialog_pair(project, post) is None  # one file: Processing's defaults stand

    # Through the algorithm as the toolbox makes it: the desktop's project and active layer.
    desktop = QgsProject.instance()
    post, pre = layers(desktop, ("post", "post"), ("pre", "pre"))
    try:
        monkeypatch.setattr(utils, "iface", DesktopInterface(post))
        algorithm = QgsApplication.processingRegistry().createAlgorithmById(ALGORITHM)
        assert [algorithm.parameterDefinition(name).guiDefaultValueOverride() for name in ("PRE", "POST")] == [
            pre.id(), post.id()]
        monkeypatch.setattr(utils, "iface", None)  # scripts and qgis_process: PRE stays required
        algorithm = QgsApplication.processingRegistry().createAlgorithmById(ALGORITHM)
        assert algorithm.parameterDefinition("PRE").defaultValueForGui() is None
    finally:
        desktop.removeMapLayers([pre.id(), post.id()])


def test_two_tables_of_one_geopackage_are_two_rasters_the_engine_cannot_read_whole(geochange_provider, levir_crop,
                                                                                   tinycd_package, tmp_path):
    """Not "the same raster" (the file is the same), refused by the engine's own message (the engine would read
    the whole file), and never a dialog's default."""
    from qgis.core import QgsProject

    from geochange.qgis_plugin.detect_algorithm import dialog_pair
    from geochange.qgis_plugin.engine_algorithm import same_raster

    rasters = tmp_path / "dates.gpkg"
    for date, table, extra in (("pre", "pre_2019", []), ("post", "post_2020", ["APPEND_SUBDATASET=YES"])):
        # The dataset returned is dropped at once, which closes it: one left open until the interpreter ends (an
        # assert's operand may be kept) crashes it after QGIS has closed GDAL.
        gdal.Translate(str(rasters), str(levir_crop[date]), format="GPKG",
                       creationOptions=[f"RASTER_TABLE={table}", *extra])
    pre, post = (QgsRasterLayer(f"GPKG:{rasters}:{table}", table, "gdal") for table in ("pre_2019", "post_2020"))
    assert pre.isValid() and post.isValid()
    assert not same_raster(pre, post) and same_raster(pre, QgsRasterLayer(pre.source(), "again", "gdal"))
    with pytest.raises(QgsProcessingException, match="PRE: 'pre_2019' is part of a file .* GeoChange reads whole "
                                                     "raster files: save it as a GeoTIFF first"):
        run_algorithm(ALGORITHM, {"PRE": pre, "POST": post, "MODEL": str(tinycd_package),
                                  "OUTPUT_PROBABILITY": str(tmp_path / "p.tif"), "OUTPUT_MASK": str(tmp_path / "m.tif"),
                                  "OUTPUT_POLYGONS": str(tmp_path / "c.gpkg")})
    project = QgsProject()
    plain = QgsRasterLayer(str(levir_crop["post"]), "post")
    for layer in (pre, post, plain):
        project.addMapLayer(layer)
    assert dialog_pair(project, plain) is None  # one raster file whole; the tables are no candidates
    # A layer of a GeoPackage's raster table still alive when QGIS exits crashes the interpreter's end (QGIS 3.22):
    # gone now, with the traceback that held two of them.
    project.removeAllMapLayers()
    del pre, post, plain
    gc.collect()


DIALOG = """
import os, sys
os.environ["QT_QPA_PLATFORM"] = "offscreen"
os.environ["GDAL_PAM_ENABLED"] = "NO"
sys.path.insert(0, {plugins!r})
from qgis.core import QgsApplication, QgsProject, QgsRasterLayer
app = QgsApplication([], True, {profile!r})
app.initQgis()
sys.path.append("/usr/share/qgis/python/plugins")
from processing.core.Processing import Processing
Processing.initialize()
import geochange
plugin = geochange.classFactory(None)
plugin.initProcessing()
pre, post = QgsRasterLayer({pre!r}, "pre"), QgsRasterLayer({post!r}, "post")
QgsProject.instance().addMapLayers([pre, post])  # the panel from the top: post, pre
from qgis.gui import QgsMapCanvas
class Desktop:
    canvas = QgsMapCanvas()
    def activeLayer(self): return post
    def mapCanvas(self): return self.canvas
    def browserModel(self): return None
import qgis.utils, processing.gui.ParametersPanel
qgis.utils.iface = processing.gui.ParametersPanel.iface = Desktop()
from processing.gui.AlgorithmDialog import AlgorithmDialog
dialog = AlgorithmDialog(QgsApplication.processingRegistry().createAlgorithmById("geochange:detectchanges"))
for name in ("PRE", "POST"):
    print(name, QgsProject.instance().mapLayer(dialog.mainWidget().wrappers[name].parameterValue()).name())
"""


def test_the_toolbox_dialog_shows_those_defaults(qgis_plugins_dir, levir_crop, tmp_path):
    """Processing's own dialog (QGIS 3.22's widgets take the parameters' GUI defaults), with the active layer
    given as the desktop gives it; without the defaults both dates would show it."""
    script = DIALOG.format(plugins=str(qgis_plugins_dir), profile=str(tmp_path), pre=str(levir_crop["pre"]),
                           post=str(levir_crop["post"]))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0 and "PRE pre\nPOST post\n" in done.stdout, done.stdout + done.stderr


def test_an_area_of_interest_from_a_memory_layer(geochange_provider, levir_crop, tinycd_package, tmp_path):
    """A layer that is no file (drawn in QGIS) is written out for the engine: the outputs cover its bounds."""
    with rasterio.open(levir_crop["pre"]) as src:
        left, bottom, right, top = src.bounds
        size = (src.width, src.height)
    aoi = QgsVectorLayer("Polygon?crs=EPSG:4326", "aoi", "memory")
    feature = QgsFeature()
    feature.setGeometry(QgsGeometry.fromRect(QgsRectangle(left, bottom, (left + right) / 2, (bottom + top) / 2)))
    aoi.dataProvider().addFeatures([feature])
    results = run_algorithm(ALGORITHM, {"PRE": str(levir_crop["pre"]), "POST": str(levir_crop["post"]),
                                        "MODEL": str(tinycd_package), "DEVICE": "cpu", "AOI": aoi,
                                        **outputs_in(tmp_path)})
    with rasterio.open(results["OUTPUT_MASK"]) as mask:
        assert (mask.width, mask.height) == pytest.approx((size[0] / 2, size[1] / 2), abs=1)


def test_an_area_of_interest_named_by_its_layer_s_index(geochange_provider, levir_crop, tinycd_package, tmp_path):
    """``FILE|layerid=1``, as QGIS names some layers of a GeoPackage: that layer, not the file's first (far away,
    which made the run fail as not overlapping), in Detect changes and in Assess change accuracy."""
    from shapely.geometry import box, mapping

    with rasterio.open(levir_crop["pre"]) as src:
        left, bottom, right, top = src.bounds
        size = (src.width, src.height)
    aois = tmp_path / "aois.gpkg"
    write_polygons(aois, [mapping(box(left + 1, bottom + 1, right + 1, top + 1))], 4326, "far")
    write_polygons(aois, [mapping(box(left, bottom, (left + right) / 2, (bottom + top) / 2))], 4326, "quarter")
    aoi = QgsVectorLayer(f"{aois}|layerid=1", "quarter", "ogr")
    assert aoi.isValid() and next(aoi.getFeatures()).geometry().boundingBox().xMaximum() < right
    results = run_algorithm(ALGORITHM, {"PRE": str(levir_crop["pre"]), "POST": str(levir_crop["post"]),
                                        "MODEL": str(tinycd_package), "DEVICE": "cpu", "AOI": aoi,
                                        **outputs_in(tmp_path)})
    with rasterio.open(results["OUTPUT_MASK"]) as mask:
        assert (mask.width, mask.height) == pytest.approx((size[0] / 2, size[1] / 2), abs=1)
    # The quarter as the reference: every pixel of the mask is a change there (the far one would give none).
    assessed = run_algorithm("geochange:assessaccuracy", {"PREDICTION": results["OUTPUT_MASK"], "REFERENCE": aoi,
                                                          "OUTPUT": str(tmp_path / "figures.csv"),
                                                          "OUTPUT_RASTER": str(tmp_path / "agreement.tif")})
    assert assessed["PRECISION_SCORE"] == 1.0


def test_band_mapping_reaches_the_engine(geochange_provider, levir_crop, tinycd_package, tmp_path):
    """Two post bands for a three-band model: the engine's own message comes back."""
    parameters = {"PRE": str(levir_crop["pre"]), "POST": str(levir_crop["post"]), "MODEL": str(tinycd_package),
                  "POST_BANDS": [3, 1], "DEVICE": "cpu", **outputs_in(tmp_path)}
    with pytest.raises(QgsProcessingException, match=r"2 post band\(s\) chosen \(\[3, 1\]\)"):
        run_algorithm(ALGORITHM, parameters)
    assert list(tmp_path.iterdir()) == []


def test_band_lists_as_text_lists_and_expressions(geochange_provider):
    """Every way a band list reaches either algorithm gives its bands in order. Detect changes' band parameter read
    the text 3,2,1 as [0]; Detect changes in many pairs' text parameter read an expression's 3,2,1 as [0]."""
    from qgis.core import QgsProperty

    from geochange.qgis_plugin.parameters import band_numbers

    registry = QgsApplication.processingRegistry()
    context = QgsProcessingContext()
    for algorithm in ("geochange:detectchanges", "geochange:detectmanypairs"):
        for given in ("3,2,1", "3;2;1", QgsProperty.fromExpression("'3,2,1'"), QgsProperty.fromValue("3,2,1")):
            if algorithm == "geochange:detectchanges" and isinstance(given, QgsProperty):
                continue  # a band parameter's expression gives a list: QGIS's own reading
            assert band_numbers(registry.algorithmById(algorithm), {"PRE_BANDS": given}, "PRE_BANDS", context) == [
                3, 2, 1], (algorithm, given)
    detect = registry.algorithmById("geochange:detectchanges")
    assert band_numbers(detect, {"PRE_BANDS": [3, 2, 1]}, "PRE_BANDS", context) == [3, 2, 1]
    assert band_numbers(detect, {}, "PRE_BANDS", context) is None


def test_polygons_as_a_shapefile_or_geojson(crop_detection, tmp_path):
    """The command line's --vector-format: QGIS refused any polygon file but a GeoPackage."""
    count = crop_detection["results"]["POLYGON_COUNT"]
    for suffix in ("shp", "geojson"):
        polygons = tmp_path / suffix / f"c.{suffix}"
        results = run_algorithm(ALGORITHM, {**crop_detection["parameters"], **outputs_in(tmp_path / suffix),
                                            "OUTPUT_POLYGONS": str(polygons)})
        again = run_algorithm("geochange:vectorizechanges", {
            "INPUT": crop_detection["results"]["OUTPUT_PROBABILITY"], "OUTPUT": str(tmp_path / f"v.{suffix}")})
        for result, key in ((results, "OUTPUT_POLYGONS"), (again, "OUTPUT")):
            layer = QgsVectorLayer(result[key], "changes", "ogr")
            assert result["POLYGON_COUNT"] == count and layer.isValid() and layer.featureCount() == count
            assert "area_m2" in layer.fields().names()
            assert layer.labelsEnabled()  # opened with the style saved beside it (c.qml)
        assert results["OUTPUT_POLYGONS"] == str(polygons)


def test_band_lists_as_text_keep_their_order(crop_detection, levir_crop, qgis_process, tmp_path):
    """Bands given as the text 3,2,1 (which QGIS itself reads as [0]), in a script and in qgis_process: the crop
    with its bands reversed, read in the order 3,2,1, gives the crop's own probabilities."""
    reversed_bands = {}
    for date in ("pre", "post"):
        with rasterio.open(levir_crop[date]) as src:
            profile, data = src.profile, src.read()
        reversed_bands[date] = tmp_path / f"{date}_bgr.tif"
        with rasterio.open(reversed_bands[date], "w", **profile) as dst:
            dst.write(data[::-1])
    expected = read_band(crop_detection["results"]["OUTPUT_PROBABILITY"])
    parameters = {**crop_detection["parameters"], "PRE": str(reversed_bands["pre"]),
                  "POST": str(reversed_bands["post"]), "PRE_BANDS": "3,2,1", "POST_BANDS": "3,2,1"}
    results = run_algorithm(ALGORITHM, {**parameters, **outputs_in(tmp_path / "script")})
    np.testing.assert_array_equal(read_band(results["OUTPUT_PROBABILITY"]), expected)

    outputs = {**parameters, **outputs_in(tmp_path / "qgis_process")}
    done = qgis_process("--json", "run", ALGORITHM, "--", *(f"{k}={v}" for k, v in outputs.items()))
    assert done.returncode == 0, done.stdout + done.stderr
    np.testing.assert_allclose(read_band(outputs["OUTPUT_PROBABILITY"]), expected, atol=1e-3)


def test_alignment_and_engine_options_reach_the_engine(geochange_provider, levir_crop, shared_data, tinycd_package,
                                                       tmp_path):
    """The crop's pre date against the post image reprojected to UTM 14N at 0.6 m and shifted: on the
    post grid at 1 m, with flips (TTA), fp32 and one thread, the outputs are in UTM at 1 m over the
    area both dates cover, and still find the crop's changes."""
    post_utm = shared_data / "levir_tile_georef" / "post_utm14n_0.6m_shifted.tif"
    results = run_algorithm(ALGORITHM, {
        "PRE": str(levir_crop["pre"]), "POST": str(post_utm), "MODEL": str(tinycd_package), "GRID": 1,
        "RESOLUTION": 1.0, "TTA": True, "PRECISION": 2, "THREADS": 1, "DEVICE": "cpu", "TILE_SIZE": 128,
        "OVERLAP": 32, **outputs_in(tmp_path)})
    mask = gdal.Open(results["OUTPUT_MASK"])
    assert mask.GetSpatialRef().GetAuthorityCode(None) == "32614"
    _, dx, _, _, _, dy = mask.GetGeoTransform()
    assert (dx, dy) == (1.0, -1.0)
    # The crop is 256 px of ~0.55 m: about 140 m on a side, so about 140 px at 1 m.
    assert 120 <= mask.RasterXSize <= 160 and 120 <= mask.RasterYSize <= 160
    changed = np.count_nonzero(read_band(results["OUTPUT_MASK"]) == 255) / (mask.RasterXSize * mask.RasterYSize)
    label = read_band(levir_crop["label"])
    assert changed == pytest.approx(np.count_nonzero(label) / label.size, abs=0.08)
    assert read_polygons(results["OUTPUT_POLYGONS"])[1]


class Log(QgsProcessingFeedback):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []
        self.warnings: list[str] = []

    def pushInfo(self, text):  # noqa: N802 (QGIS's name)
        self.lines.append(text)

    def pushWarning(self, text):  # noqa: N802 (QGIS's name)
        self.warnings.append(text)


def test_engine_log_lines_name_the_parameters(geochange_provider, levir_crop, tinycd_package, tmp_path):
    """The engine's log names its options as the command line does: QGIS's log names the parameters instead
    (here the advice on pixels ten times coarser than the model's 0.5 m)."""
    coarse = {}
    for date in ("pre", "post"):
        with rasterio.open(levir_crop[date]) as src:
            profile, data = src.profile, src.read()
        coarse[date] = tmp_path / f"{date}_coarse.tif"
        with rasterio.open(coarse[date], "w", **dict(profile, transform=src.transform * Affine.scale(10))) as dst:
            dst.write(data)
    log = Log()
    run_algorithm(ALGORITHM, {"PRE": str(coarse["pre"]), "POST": str(coarse["post"]), "MODEL": str(tinycd_package),
                              "DEVICE": "cpu", **outputs_in(tmp_path / "out")}, log)
    advice = [line for line in log.lines if line.startswith("the model was trained on 0.5 m pixels")]
    assert advice and "; RESOLUTION model reads both dates at the model's pixel size" in advice[0], log.lines
    assert not any("--resolution" in line for line in log.lines), log.lines


def test_a_router_package_runs_o_p_routing(crop_detection, tinycd_package, tmp_path):
    """An O-P router whose original model and teachers are all TinyCD: routing runs, and every window's
    prediction is a teacher's, i.e. the plain model's."""
    from geochange.engine.package import save_router

    router = save_router(tmp_path / "router.safetensors", tinycd_package,
                         [("small", tinycd_package), ("large", tinycd_package)], [0.1])
    log = Log()
    parameters = {**crop_detection["parameters"], "MODEL": str(router), **outputs_in(tmp_path / "out")}
    results = run_algorithm(ALGORITHM, parameters, log)
    assert any(line.startswith("O-P routing: original model and 2 teachers") for line in log.lines), log.lines
    assert any("teacher small (CAR <= 0.1)" in line for line in log.lines)  # the router's manifest is shown
    np.testing.assert_array_equal(read_band(results["OUTPUT_PROBABILITY"]),
                                  read_band(crop_detection["results"]["OUTPUT_PROBABILITY"]))

    info = run_algorithm("geochange:modelinfo", {"MODEL": str(router), "OUTPUT": str(tmp_path / "router.csv")})
    assert info["ARCHITECTURE"] == "O-P router of tinycd with 2 teachers" and info["THRESHOLD"] == 0.5
    table = (tmp_path / "router.csv").read_text()
    assert "teachers.0.name,small" in table and "teachers.1.manifest.architecture,tinycd" in table


class CancelAfterFirstUpdate(QgsProcessingFeedback):
    """Cancels as soon as the engine reports progress, as a user pressing Cancel would."""

    def __init__(self):
        super().__init__()
        self.updates: list[float] = []
        self.progressChanged.connect(self._on_progress)

    def _on_progress(self, percent: float) -> None:
        self.updates.append(percent)
        self.cancel()


def test_cancel_leaves_no_output(geochange_provider, levir_crop, tinycd_package, tmp_path):
    feedback = CancelAfterFirstUpdate()
    parameters = {"PRE": str(levir_crop["pre"]), "POST": str(levir_crop["post"]), "MODEL": str(tinycd_package),
                  "DEVICE": "cpu", "TILE_SIZE": 64, "OVERLAP": 16, "BATCH_SIZE": 1, **outputs_in(tmp_path)}
    with pytest.raises(QgsProcessingException, match="cancel") as raised:
        run_algorithm(ALGORITHM, parameters, feedback)
    assert len(feedback.updates) >= 1 and feedback.updates[0] < 100
    # The engine process caught the SIGTERM and unwound (its finally blocks ran), it was not killed.
    assert "stopped cleanly" in str(raised.value)
    assert list(tmp_path.iterdir()) == []


class Progress(QgsProcessingFeedback):
    """The percentages and lines the engine gives the algorithm's feedback."""

    def __init__(self):
        super().__init__()
        self.percents: list[float] = []
        self.lines: list[str] = []
        self.progressChanged.connect(self.percents.append)

    def pushInfo(self, text):  # noqa: N802 (QGIS's name)
        self.lines.append(text)


def test_the_feedback_moves_window_by_window_and_through_a_single_window(geochange_provider, levir_crop,
                                                                         tinycd_package, tmp_path):
    """9 windows of 128 px: at least one move a window, never back, ending at 100; one window of 256 px:
    values between 0 and 100 (its reading, the model, the rows written, the outputs finished)."""
    for name, tile, windows in (("nine", 128, 9), ("one", 256, 1)):
        feedback = Progress()
        run_algorithm(ALGORITHM, {"PRE": str(levir_crop["pre"]), "POST": str(levir_crop["post"]),
                                  "MODEL": str(tinycd_package), "DEVICE": "cpu", "TILE_SIZE": tile, "OVERLAP": 32,
                                  **outputs_in(tmp_path / name)}, feedback)
        percents = feedback.percents
        assert percents[-1] == 100 and all(a <= b for a, b in zip(percents, percents[1:])), percents
        assert len({p for p in percents if 0 < p < 100}) >= max(windows, 3), percents


def test_the_resolution_parameter_takes_model(geochange_provider, levir_crop, tinycd_package, tmp_path):
    """RESOLUTION model reads the crop's ~0.55 m pixels at the model's 0.5 m and writes on the crop's grid; a
    text that is neither a number nor model is refused before the run, in QGIS's names."""
    feedback = Progress()
    parameters = {"PRE": str(levir_crop["pre"]), "POST": str(levir_crop["post"]), "MODEL": str(tinycd_package),
                  "DEVICE": "cpu", "RESOLUTION": "model", **outputs_in(tmp_path / "model")}
    results = run_algorithm(ALGORITHM, parameters, feedback)
    assert any(line.startswith("both dates read at the model's 0.5 m pixels") for line in feedback.lines)
    mask, label = gdal.Open(results["OUTPUT_MASK"]), gdal.Open(str(levir_crop["label"]))
    assert (mask.RasterXSize, mask.RasterYSize) == (label.RasterXSize, label.RasterYSize)
    assert np.allclose(mask.GetGeoTransform(), label.GetGeoTransform())
    assert change_f1(read_band(results["OUTPUT_MASK"]), read_band(levir_crop["label"])) >= 0.85
    with pytest.raises(QgsProcessingException, match="RESOLUTION must be a number above 0 or model, not 'fine'"):
        run_algorithm(ALGORITHM, {**parameters, "RESOLUTION": "fine", **outputs_in(tmp_path / "fine")})
    assert not (tmp_path / "fine").exists()
