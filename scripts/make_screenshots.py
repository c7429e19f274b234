"""Regenerate the QGIS screenshots of the README (offscreen, no display needed):

    .venv/bin/python scripts/make_screenshots.py [--data ../shared/data] [--device cpu]

- ``docs/detect_dialog.png``: the *Detect changes* dialog as the Processing toolbox opens it, filled in
  for the demo pair, with its help panel.
- ``docs/demo_layers.png``: the demo run through QGIS (``runAndLoadResults``, as the toolbox runs it):
  the post image under the styled change probability and the change polygons labelled with their area,
  rendered by QGIS's map renderer.
- ``docs/assessment.png``: *Assess change accuracy* of that run's change mask against the tile's label, its
  TP/FP/FN raster as QGIS styles it, over the post image.

Pictures are saved in 256 indexed colours, which keeps them a fraction of their full-colour size.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from geochange.engine.shared_data import shared_data_dir

REPO = Path(__file__).resolve().parents[1]
QGIS_PLUGINS = "/usr/share/qgis/python/plugins"  # Debian's location of Processing


def start_qgis(profile: Path):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    os.environ["GDAL_PAM_ENABLED"] = "NO"  # no .aux.xml beside the shared data
    from qgis.core import QgsApplication

    app = QgsApplication([], True, str(profile))
    app.initQgis()
    sys.path.append(QGIS_PLUGINS)
    from processing.core.Processing import Processing

    Processing.initialize()
    import geochange

    plugin = geochange.classFactory(None)
    plugin.initProcessing()
    return app, plugin


def demo_package(data: Path) -> Path:
    """``make demo``'s package of the TinyCD authors' LEVIR-CD weights, made if missing (by the engine's
    command line, so that this QGIS process never imports torch)."""
    import subprocess

    package = REPO / "demo_out" / "tinycd_levir.safetensors"
    if package.exists():
        return package
    subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-m", "geochange.engine", "import-weights", "--format",
                    "tinycd", str(data / "weights" / "tinycd_levir_official.pth"), str(package)], check=True)
    return package


def detect_dialog(pre, post, package: Path, out: Path) -> Path:
    from processing.gui.AlgorithmDialog import AlgorithmDialog
    from qgis.core import QgsApplication
    from qgis.PyQt.QtWidgets import QApplication

    algorithm = QgsApplication.processingRegistry().createAlgorithmById("geochange:detectchanges")
    dialog = AlgorithmDialog(algorithm)
    dialog.setParameters({"PRE": pre, "POST": post, "MODEL": str(package.relative_to(REPO)), "DEVICE": "auto",
                          "MIN_AREA": 20.0})
    dialog.resize(1180, 900)
    dialog.show()
    for _ in range(5):
        QApplication.processEvents()
    save_small(dialog.grab().toImage(), out)
    dialog.close()
    return out


def save_small(image, out: Path) -> None:
    from qgis.PyQt.QtCore import Qt
    from qgis.PyQt.QtGui import QImage

    image.convertToFormat(QImage.Format_Indexed8, Qt.ThresholdDither).save(str(out), "PNG", 0)


def render(layers: list, out: Path) -> Path:
    """``layers`` (the first on top) drawn over the last one's extent, 1024 px wide."""
    from qgis.core import QgsMapRendererParallelJob, QgsMapSettings
    from qgis.PyQt.QtCore import QSize
    from qgis.PyQt.QtGui import QColor

    settings = QgsMapSettings()
    settings.setLayers(layers)
    settings.setDestinationCrs(layers[-1].crs())
    settings.setExtent(layers[-1].extent())
    settings.setOutputSize(QSize(1024, 1024))
    settings.setBackgroundColor(QColor(255, 255, 255))
    job = QgsMapRendererParallelJob(settings)
    job.start()
    job.waitForFinished()
    save_small(job.renderedImage(), out)
    return out


def demo_layers(pre, post, package: Path, folder: Path, device: str, out: Path) -> Path:
    import processing
    from qgis.core import QgsProject

    results = processing.runAndLoadResults("geochange:detectchanges", {
        "PRE": pre, "POST": post, "MODEL": str(package), "DEVICE": device, "MIN_AREA": 20.0, "SIMPLIFY": 0.5,
        "OUTPUT_PROBABILITY": str(folder / "change_probability.tif"), "OUTPUT_MASK": str(folder / "change_mask.tif"),
        "OUTPUT_POLYGONS": str(folder / "change_polygons.gpkg")})
    print(f"{results['POLYGON_COUNT']} change polygons, {results['CHANGED_AREA_M2']:,.0f} m2 changed")
    layers = {layer.name(): layer for layer in QgsProject.instance().mapLayers().values()}
    probability = layers["pre vs post: change probability"]
    probability.renderer().setOpacity(0.55)  # the imagery and the polygon outlines stay visible
    # Drawn top first: polygons over the probability over the post image (the mask stays in the project).
    return render([layers["pre vs post: change polygons"], probability, layers["post"]], out)


def assessment(post, label: Path, folder: Path, out: Path) -> Path:
    """The demo's change mask (loaded by ``demo_layers``) assessed against the label, as the toolbox runs it."""
    import processing
    from qgis.core import QgsProject

    layers = {layer.name(): layer for layer in QgsProject.instance().mapLayers().values()}
    results = processing.runAndLoadResults("geochange:assessaccuracy", {
        "PREDICTION": layers["pre vs post: change mask"].id(), "REFERENCE": str(label),
        "OUTPUT": str(folder / "accuracy.html"), "OUTPUT_RASTER": str(folder / "tpfpfn.tif")})
    print("assessment: " + ", ".join(f"{name} {results[name]:.4f}" for name in ("F1", "IOU", "KAPPA")))
    agreement = next(layer for layer in QgsProject.instance().mapLayers().values()
                     if layer.name() == "pre vs post: change mask: TP/FP/FN")
    return render([agreement, QgsProject.instance().mapLayer(post)], out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=shared_data_dir())
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    tile = args.data / "levir_tile_georef"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        app, plugin = start_qgis(folder / "profile")
        from qgis.core import QgsProject, QgsRasterLayer

        pre = QgsRasterLayer(str(tile / "pre.tif"), "pre")
        post = QgsRasterLayer(str(tile / "post.tif"), "post")
        QgsProject.instance().addMapLayers([pre, post])
        package = demo_package(args.data)
        print(detect_dialog(pre.id(), post.id(), package, REPO / "docs" / "detect_dialog.png"))
        print(demo_layers(pre.id(), post.id(), package, folder, args.device, REPO / "docs" / "demo_layers.png"))
        print(assessment(post.id(), tile / "label.tif", folder, REPO / "docs" / "assessment.png"))
        QgsProject.instance().clear()
        plugin.unload()
        app.exitQgis()
    return 0


if __name__ == "__main__":
    sys.exit(main())
