"""The Processing algorithm ``geochange:detectchanges`` in a real headless QGIS and in qgis_process.

The model is the TinyCD authors' LEVIR weights on a whole LEVIR-CD test tile (1024x1024, EPSG:4326);
it runs once in-process and once through qgis_process, and both results are checked against the label.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("qgis.core", reason="QGIS Python bindings are not installed")
from osgeo import gdal, ogr  # noqa: E402  (GDAL's bindings come with QGIS)
from qgis.core import (  # noqa: E402
    QgsApplication,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
)

gdal.UseExceptions()
ogr.UseExceptions()

ALGORITHM = "geochange:detectchanges"


@pytest.fixture(scope="module")
def provider(qgis_app):
    """The plugin started the way QGIS starts it: ``classFactory`` then ``initProcessing``."""
    import geochange

    plugin = geochange.classFactory(None)
    plugin.initProcessing()
    yield QgsApplication.processingRegistry().providerById("geochange")
    plugin.unload()


@pytest.fixture(scope="module")
def pair(shared_data) -> dict:
    folder = shared_data / "levir_tile_georef"
    return {"PRE": str(folder / "pre.tif"), "POST": str(folder / "post.tif"),
            "label": folder / "label.tif"}


def outputs_in(folder: Path) -> dict:
    return {"OUTPUT_PROBABILITY": str(folder / "probability.tif"),
            "OUTPUT_MASK": str(folder / "mask.tif"),
            "OUTPUT_POLYGONS": str(folder / "changes.gpkg")}


def run_in_qgis(parameters: dict, feedback: QgsProcessingFeedback | None = None) -> dict:
    import processing

    feedback = feedback or QgsProcessingFeedback()
    context = QgsProcessingContext()
    context.setFeedback(feedback)
    return processing.run(ALGORITHM, parameters, feedback=feedback, context=context)


@pytest.fixture(scope="module")
def qgis_run(provider, pair, tinycd_package, tmp_path_factory) -> dict:
    """One in-process run on the whole tile, shared by the assertions below."""
    folder = tmp_path_factory.mktemp("qgis_run")
    parameters = {"PRE": pair["PRE"], "POST": pair["POST"], "MODEL": str(tinycd_package),
                  "DEVICE": "cpu", "TILE_SIZE": 512, "OVERLAP": 64, **outputs_in(folder)}
    return {"parameters": parameters, "results": run_in_qgis(parameters)}


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
    # (degrees to metres at the tile's latitude; the tile spans a few hundred metres).
    x0, dx, _, y0, _, dy = label.GetGeoTransform()
    latitude = np.radians(y0 + dy * label.RasterYSize / 2)
    pixel_m2 = abs(dx * 111_320 * np.cos(latitude) * dy * 110_574)
    assert sum(r["area_m2"] for r in rows) == pytest.approx(np.count_nonzero(m == 255) * pixel_m2, rel=0.05)


def test_provider_lists_the_algorithm(provider):
    assert provider is not None and provider.name() == "GeoChange"
    algorithm = QgsApplication.processingRegistry().algorithmById(ALGORITHM)
    assert algorithm is not None and algorithm.displayName() == "Detect changes"
    names = {p.name() for p in algorithm.parameterDefinitions()}
    assert names == {"PRE", "POST", "MODEL", "DEVICE", "TILE_SIZE", "OVERLAP", "BATCH_SIZE",
                     "THRESHOLD", "MIN_AREA", "SIMPLIFY", "OUTPUT_PROBABILITY", "OUTPUT_MASK",
                     "OUTPUT_POLYGONS"}
    defaults = {p.name(): p.defaultValue() for p in algorithm.parameterDefinitions()}
    assert (defaults["TILE_SIZE"], defaults["OVERLAP"], defaults["BATCH_SIZE"]) == (512, 64, 4)
    assert algorithm.parameterDefinition("THRESHOLD").flags() & algorithm.parameterDefinition(
        "THRESHOLD").FlagOptional
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
heavy = sorted(m for m in ("torch", "timm", "safetensors", "geochange.engine") if m in sys.modules)
print("HEAVY", heavy)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert "HEAVY []" in done.stdout, done.stdout + done.stderr


def test_processing_run_writes_the_three_outputs(qgis_run, pair):
    results, parameters = qgis_run["results"], qgis_run["parameters"]
    for key in ("OUTPUT_PROBABILITY", "OUTPUT_MASK", "OUTPUT_POLYGONS"):
        assert Path(results[key]) == Path(parameters[key])
    assert results["POLYGON_COUNT"] == len(read_polygons(results["OUTPUT_POLYGONS"])[1])
    assert results["CHANGED_AREA_M2"] > 0
    check_outputs(results, pair["label"])


def test_qgis_process_runs_the_algorithm(qgis_process, qgis_run, pair, tinycd_package, tmp_path):
    listed = qgis_process("list")
    assert ALGORITHM in listed.stdout, listed.stdout + listed.stderr

    outputs = outputs_in(tmp_path)
    done = qgis_process("--json", "run", ALGORITHM, "--", f"PRE={pair['PRE']}",
                        f"POST={pair['POST']}", f"MODEL={tinycd_package}", "DEVICE=cpu",
                        "TILE_SIZE=512", "OVERLAP=64", "BATCH_SIZE=2",
                        *(f"{k}={v}" for k, v in outputs.items()))
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(done.stdout)["results"]
    for key, path in outputs.items():
        assert Path(results[key]) == Path(path)
    check_outputs(outputs, pair["label"])
    # Same model, same pixels: the same answer as the in-process run (batching must not matter).
    in_qgis = qgis_run["results"]
    np.testing.assert_allclose(read_band(outputs["OUTPUT_PROBABILITY"]),
                               read_band(in_qgis["OUTPUT_PROBABILITY"]), atol=1e-4)


def test_engine_error_becomes_processing_exception(provider, pair, shared_data, tmp_path):
    pickle = shared_data / "weights" / "tinycd_levir_official.pth"
    parameters = {"PRE": pair["PRE"], "POST": pair["POST"], "MODEL": str(pickle),
                  "DEVICE": "cpu", **outputs_in(tmp_path)}
    with pytest.raises(QgsProcessingException) as raised:
        run_in_qgis(parameters)
    message = str(raised.value)
    assert pickle.name in message and "pickle" in message.lower(), message
    assert list(tmp_path.iterdir()) == []


class CancelAfterFirstUpdate(QgsProcessingFeedback):
    """Cancels as soon as the first batch has reported progress, as a user pressing Cancel would."""

    def __init__(self):
        super().__init__()
        self.updates: list[float] = []
        self.progressChanged.connect(self._on_progress)

    def _on_progress(self, percent: float) -> None:
        self.updates.append(percent)
        self.cancel()


def test_cancel_leaves_no_output(provider, pair, tinycd_package, tmp_path):
    feedback = CancelAfterFirstUpdate()
    parameters = {"PRE": pair["PRE"], "POST": pair["POST"], "MODEL": str(tinycd_package),
                  "DEVICE": "cpu", "TILE_SIZE": 512, "OVERLAP": 64, "BATCH_SIZE": 1,
                  **outputs_in(tmp_path)}
    with pytest.raises(QgsProcessingException, match="cancel"):
        run_in_qgis(parameters, feedback)
    assert len(feedback.updates) >= 1 and feedback.updates[0] < 100
    assert list(tmp_path.iterdir()) == []
