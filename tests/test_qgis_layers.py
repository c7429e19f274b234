"""What an analyst sees of a detection in QGIS (headless, real runs): the outputs stacked polygons over mask
over probability whatever order QGIS loads them in, names that keep what tells the inputs apart, areas
rounded in the attribute table, labels at large scales only, the probability's legend, and polygons
written to a named layer of a GeoPackage."""
from __future__ import annotations

import shutil

import pytest

pytest.importorskip("qgis.core", reason="QGIS Python bindings are not installed")
from osgeo import ogr  # noqa: E402
from qgis.core import QgsApplication, QgsLayerTree, QgsLayerTreeModel, QgsProcessingException, QgsProject  # noqa: E402
from qgis.PyQt.QtCore import QLocale, Qt  # noqa: E402

from conftest import run_algorithm  # noqa: E402
from geochange.qgis_plugin.styles import LABEL_MINIMUM_SCALE, pair_name  # noqa: E402

ogr.UseExceptions()


@pytest.mark.parametrize("pre, post, name", [
    ("pre", "post", "pre vs post"),
    ("S2_2019_06_01_T33UXP", "S2_2019_08_15_T33UXP", "06_01 vs 08_15 (S2_2019_…_T33UXP)"),
    ("S2_2019_06_01", "S2_2019_08_15", "06_01 vs 08_15 (S2_2019_…)"),
    ("before_T33UXP_L2A", "after_T33UXP_L2A", "before vs after (…_T33UXP_L2A)"),
    ("img_2019", "img_2020", "img_2019 vs img_2020"),  # a short shared part: the names stay whole
    ("a_b", "a-b", "a_b vs a-b"),  # names are cut between words only
    ("S2_2019_06_01", "S2_2019_06_01", "S2_2019_06_01 vs S2_2019_06_01"),  # two folders' files
])
def test_pair_name_keeps_what_tells_the_inputs_apart(qgis_app, pre, post, name):
    assert pair_name(pre, post) == name


KINDS = ("polygons", "mask", "probability")  # from the top of the layer tree


def stacked(layers) -> bool:
    """Whether the layers' tree nodes are siblings, next to each other, in this order from the top."""
    nodes = [QgsProject.instance().layerTreeRoot().findLayer(layer.id()) for layer in layers]
    children = [child.layerId() if QgsLayerTree.isLayer(child) else None for child in nodes[0].parent().children()]
    ids = [layer.id() for layer in layers]
    return ids[0] in children and children[children.index(ids[0]):children.index(ids[0]) + len(ids)] == ids


def test_the_outputs_are_stacked_and_styled_for_the_analyst(crop_detection):
    """QGIS 3.22 loads changes.gpkg, mask.tif, probability.tif in that order (their names'), each on top."""
    layers = crop_detection["layers"]
    polygons, mask, probability = (layers[f"pre vs post: change {kind}"] for kind in KINDS)
    assert stacked([polygons, mask, probability])

    root = QgsProject.instance().layerTreeRoot()
    model = QgsLayerTreeModel(root)  # kept in a name: it owns the legend nodes
    assert model.layerLegendNodes(root.findLayer(probability.id()))[0].data(Qt.DisplayRole) == "change probability"

    labels = polygons.labeling().settings()
    assert labels.scaleVisibility and labels.minimumScale == LABEL_MINIMUM_SCALE == 10_000
    assert labels.maximumScale == 0  # however far in
    # The table shows whole square metres; the file keeps the computed areas.
    index = polygons.fields().indexOf("area_m2")
    setup = polygons.editorWidgetSetup(index)
    formatter = QgsApplication.fieldFormatterRegistry().fieldFormatter(setup.type())
    areas = [feature["area_m2"] for feature in polygons.getFeatures()]
    assert any(area != round(area) for area in areas)
    for area in areas:
        assert formatter.representValue(polygons, index, setup.config(), None, area) == QLocale().toString(area, "f", 0)


def test_a_results_group_and_a_geopackage_layer(crop_detection, levir_crop, tinycd_package, tmp_path):
    """Outputs loaded in the other order (probability first), into the Processing setting's results group
    (each appended at its end), the polygons into a layer of a GeoPackage as the output widget's *Save to
    GeoPackage…* names it, from inputs named as Sentinel-2 products."""
    from processing.core.ProcessingConfig import ProcessingConfig

    pre, post = tmp_path / "S2_2019_06_01_T33UXP.tif", tmp_path / "S2_2019_08_15_T33UXP.tif"
    shutil.copy(levir_crop["pre"], pre)
    shutil.copy(levir_crop["post"], post)
    geopackage = tmp_path / "out" / "results.gpkg"
    geopackage.parent.mkdir()
    parameters = {**crop_detection["parameters"], "PRE": str(pre), "POST": str(post),
                  "OUTPUT_PROBABILITY": str(tmp_path / "out" / "a_probability.tif"),
                  "OUTPUT_MASK": str(tmp_path / "out" / "b_mask.tif"),
                  "OUTPUT_POLYGONS": f"ogr:dbname='{geopackage}' table=\"output_polygons\""}
    before = set(QgsProject.instance().mapLayers())
    ProcessingConfig.setSettingValue(ProcessingConfig.RESULTS_GROUP_NAME, "GeoChange results")
    try:
        results = run_algorithm("geochange:detectchanges", parameters, load=True)
    finally:
        ProcessingConfig.setSettingValue(ProcessingConfig.RESULTS_GROUP_NAME, "")
    added = {layer.name(): layer for layer_id, layer in QgsProject.instance().mapLayers().items()
             if layer_id not in before}
    pair = "06_01 vs 08_15 (S2_2019_…_T33UXP)"
    assert set(added) == {f"{pair}: change {kind}" for kind in KINDS}
    polygons, mask, probability = (added[f"{pair}: change {kind}"] for kind in KINDS)
    assert stacked([polygons, mask, probability])
    group = QgsProject.instance().layerTreeRoot().findGroup("GeoChange results")
    assert group is not None and group.findLayer(polygons.id()) is not None

    assert results["OUTPUT_POLYGONS"] == f"{geopackage}|layername=output_polygons"
    assert polygons.source() == results["OUTPUT_POLYGONS"] and polygons.featureCount() == results["POLYGON_COUNT"]
    source = ogr.Open(str(geopackage))
    assert [source.GetLayer(i).GetName() for i in range(source.GetLayerCount())] == ["output_polygons"]


def test_a_run_again_into_loaded_outputs_shows_the_new_ones(crop_detection, levir_crop, tmp_path):
    """The same outputs, loaded, then written again with a higher threshold over a quarter of the crop: QGIS
    gives the layers already in the project, which showed the earlier run's polygons and mask (their files replaced
    by a rename), and the rasters its extent."""
    import numpy as np
    import rasterio
    from qgis.core import QgsFeature, QgsGeometry, QgsRasterLayer, QgsRectangle, QgsVectorLayer

    with rasterio.open(levir_crop["pre"]) as src:
        left, bottom, right, top = src.bounds
    quarter = QgsVectorLayer("Polygon?crs=EPSG:4326", "quarter", "memory")
    feature = QgsFeature()
    feature.setGeometry(QgsGeometry.fromRect(QgsRectangle(left, bottom, (left + right) / 2, (bottom + top) / 2)))
    quarter.dataProvider().addFeatures([feature])
    parameters = {**crop_detection["parameters"], "OUTPUT_PROBABILITY": str(tmp_path / "probability.tif"),
                  "OUTPUT_MASK": str(tmp_path / "mask.tif"), "OUTPUT_POLYGONS": str(tmp_path / "changes.gpkg")}
    for changed in ({"THRESHOLD": 0.3}, {"THRESHOLD": 0.95, "AOI": quarter}):
        results = run_algorithm("geochange:detectchanges", {**parameters, **changed}, load=True)
        layers = {layer.source().split("|")[0]: layer for layer in QgsProject.instance().mapLayers().values()}
        polygons, mask = layers[parameters["OUTPUT_POLYGONS"]], layers[parameters["OUTPUT_MASK"]]
        assert polygons.featureCount() == results["POLYGON_COUNT"]
        for name in ("OUTPUT_MASK", "OUTPUT_PROBABILITY"):
            assert layers[parameters[name]].extent() == QgsRasterLayer(parameters[name]).extent(), (name, changed)
        block = mask.dataProvider().block(1, mask.extent(), mask.width(), mask.height())
        shown = np.frombuffer(bytes(block.data()), np.uint8)
        with rasterio.open(parameters["OUTPUT_MASK"]) as src:
            assert np.count_nonzero(shown == 255) == np.count_nonzero(src.read(1) == 255), changed
    assert mask.renderer().type() == "paletted"  # styled again
    assert len([layer for layer in layers.values() if layer.source().startswith(str(tmp_path))]) == 3


def test_vectorize_into_a_geopackage_layer_keeps_the_file_s_other_layers(crop_detection, tmp_path):
    """The engine writes a whole GeoPackage: a layer name is honoured, and a file holding other layers is
    refused before the run rather than emptied of them."""
    geopackage = tmp_path / "changes.gpkg"
    parameters = {"INPUT": crop_detection["results"]["OUTPUT_PROBABILITY"], "THRESHOLD": 0.6}
    results = run_algorithm("geochange:vectorizechanges", {**parameters, "OUTPUT": f"{geopackage}|layername=p60"})
    assert results["OUTPUT"] == f"{geopackage}|layername=p60" and results["POLYGON_COUNT"] > 0
    with pytest.raises(QgsProcessingException, match=r"OUTPUT: '.*changes.gpkg' holds other layers \(p60\), which "
                                                     "GeoChange would delete"):
        run_algorithm("geochange:vectorizechanges", {**parameters,
                                                     "OUTPUT": f"ogr:dbname='{geopackage}' table=\"p70\" (geom)"})
    source = ogr.Open(str(geopackage))
    assert source.GetLayerCount() == 1 and source.GetLayer(0).GetName() == "p60"
    assert source.GetLayer(0).GetFeatureCount() == results["POLYGON_COUNT"]
