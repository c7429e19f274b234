"""Shared fixtures: the real data beside the project, and packages made from it once per session."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from affine import Affine

from geochange.engine.progress import Progress
from geochange.engine.shared_data import shared_data_dir

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = shared_data_dir()


class Recorded(Progress):
    """A progress that keeps what it is told: ``done``, the (done, total) of each update, and ``lines``."""

    def __init__(self):
        self.done, self.lines = [], []

    def update(self, done, total):
        self.done.append((done, total))

    def log(self, message):
        self.lines.append(message)


def pytest_sessionstart(session):
    """In CI (``CI`` set, as .ci/run sets it) what the suite skips without (the real data, QGIS's bindings,
    OpenVINO) must be there: a skip would turn the tests that need it into a green run."""
    if not os.environ.get("CI"):
        return
    import importlib

    missing = [] if SHARED_DATA.is_dir() else [f"the real data at {SHARED_DATA}"]
    for module in ("qgis.core", "openvino"):
        try:
            importlib.import_module(module)
        except ImportError as error:
            missing.append(f"{module} ({error})")
    if missing:
        pytest.exit(f"CI: {'; '.join(missing)} missing: the tests that need it would be skipped", returncode=3)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (set GEOCHANGE_SHARED_DATA)")
    return SHARED_DATA


def free_port() -> int:
    """A port no other process holds now, for a process group's rendezvous (a fixed one may be in use: another
    suite on the machine)."""
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        return free.getsockname()[1]


@pytest.fixture
def published_heads(monkeypatch):
    """The heads' fuse run as the authors run it (levels resized, concatenated, then the 1x1 conv), the form
    their published FLOPs count; ``heads.fuse_resized`` computes the same function with fewer."""
    import torch
    import torch.nn.functional as F

    from geochange.engine.models import changer, heads

    def resized_then_fused(fuse, parts, size):
        return fuse(torch.cat([F.interpolate(p, size=size, mode="bilinear", align_corners=False) for p in parts],
                              dim=1))

    for module in (heads, changer):
        monkeypatch.setattr(module, "fuse_resized", resized_then_fused)


@pytest.fixture(scope="session")
def tinycd_package(shared_data, tmp_path_factory) -> Path:
    """The TinyCD authors' LEVIR weights imported into a GeoChange package."""
    from geochange.engine.importers import import_weights

    out = tmp_path_factory.mktemp("packages") / "tinycd_levir.safetensors"
    import_weights("tinycd", shared_data / "weights" / "tinycd_levir_official.pth", out)
    return out


@pytest.fixture(scope="session")
def random_package(tmp_path_factory) -> Path:
    """TinyCD with random weights in a package."""
    from geochange.engine.manifest import make_manifest
    from geochange.engine.models import create
    from geochange.engine.package import save_package

    path = tmp_path_factory.mktemp("pkg") / "random_tinycd.safetensors"
    return save_package(create("tinycd").eval(), make_manifest("tinycd"), path)


@pytest.fixture
def one_and_two_ranks(tmp_path):
    """``run(args)``: ``geochange detect ARGS`` in one process, then under torchrun with two
    ranks; returns the two output folders (``one``, ``two``) once both succeeded."""
    def run(args: list[str]) -> tuple[Path, Path]:
        single = subprocess.run([sys.executable, "-m", "geochange.engine", "detect", *args, "--out",
                                 str(tmp_path / "one")], capture_output=True, text=True, timeout=600)
        assert single.returncode == 0, single.stderr
        ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                "--master-port", str(free_port()), "-m", "geochange.engine", "detect", *args,
                                "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=600)
        assert ranks.returncode == 0, ranks.stderr
        return tmp_path / "one", tmp_path / "two"
    return run


# --- QGIS ------------------------------------------------------------------------------------------
# QGIS loads a plugin by its folder name, so the tests expose the repository as ``geochange`` in a
# plugins folder of their own, and run QGIS with a throw-away profile so the user's is never read.

QGIS_PROCESSING_PLUGINS = "/usr/share/qgis/python/plugins"  # where Debian puts ``processing``
# Debian's ``qgis_process`` wrapper passes an option 3.22 rejects; its binary works.
QGIS_PROCESS = os.environ.get("GEOCHANGE_QGIS_PROCESS", "/usr/bin/qgis_process.bin")


@pytest.fixture(scope="session")
def qgis_plugins_dir(tmp_path_factory) -> Path:
    """A QGIS plugins folder holding the repository under the name ``geochange``."""
    folder = tmp_path_factory.mktemp("qgis_plugins")
    (folder / "geochange").symlink_to(REPO, target_is_directory=True)
    return folder


@pytest.fixture(scope="session")
def qgis_app(tmp_path_factory):
    """A headless QgsApplication with Processing initialised, shared by the whole session."""
    pytest.importorskip("qgis.core", reason="QGIS Python bindings are not installed")
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    # QGIS computes statistics of every raster layer it opens and GDAL would save them beside the
    # shared, read-only test data as .aux.xml files.
    os.environ["GDAL_PAM_ENABLED"] = "NO"
    from qgis.core import QgsApplication

    app = QgsApplication([], False, str(tmp_path_factory.mktemp("qgis_profile")))
    app.initQgis()
    if QGIS_PROCESSING_PLUGINS not in sys.path:
        sys.path.append(QGIS_PROCESSING_PLUGINS)
    from processing.core.Processing import Processing

    Processing.initialize()
    yield app
    app.exitQgis()


def qgis_process_environment(home: Path, plugins_dir: Path) -> dict:
    """What ``qgis_process`` needs to run the plugin: no display, a private profile and the plugins
    folder. No PYTHONPATH: QGIS's Python never imports torch, the engine runs in the .venv beside the
    plugin (see qgis_plugin/worker_client.py)."""
    runtime = home / "runtime"
    runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GEOCHANGE_PYTHON")}
    env.update({
        "QT_QPA_PLATFORM": "offscreen",
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / "data"),  # the QGIS profile lives here
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_CACHE_HOME": str(home / "cache"),
        "XDG_RUNTIME_DIR": str(runtime),
        "QGIS_PLUGINPATH": str(plugins_dir),
        "GDAL_PAM_ENABLED": "NO",  # no .aux.xml statistics beside the input rasters
    })
    return env


@pytest.fixture(scope="session")
def qgis_process(qgis_plugins_dir, tmp_path_factory):
    """Run ``qgis_process`` with the plugin enabled: ``qgis_process("run", alg, "--", "A=1")``;
    ``environment`` adds variables for one call."""
    if not os.access(QGIS_PROCESS, os.X_OK):
        pytest.skip(f"{QGIS_PROCESS} not found (set GEOCHANGE_QGIS_PROCESS)")
    env = qgis_process_environment(tmp_path_factory.mktemp("qgis_home"), qgis_plugins_dir)

    def run(*args: str, timeout: float = 300, environment: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([QGIS_PROCESS, *args], env={**env, **(environment or {})}, capture_output=True,
                              text=True, timeout=timeout)

    enabled = run("plugins", "enable", "geochange", timeout=120)
    assert enabled.returncode == 0, enabled.stdout + enabled.stderr
    return run


@pytest.fixture(scope="session")
def plugin_zip(tmp_path_factory) -> Path:
    """``make plugin``'s zip, for "Install from ZIP"."""
    folder = tmp_path_factory.mktemp("dist")
    done = subprocess.run(["make", "-s", "plugin", f"DIST={folder}", f"PLUGIN_BUILD={folder / 'build'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    version = re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    path = folder / f"geochange-{version}.zip"
    assert done.stdout.strip().endswith(path.name) and path.is_file()
    return path


@pytest.fixture(scope="session")
def geochange_provider(qgis_app):
    """The plugin started the way QGIS starts it: ``classFactory`` then ``initProcessing``."""
    import geochange
    from qgis.core import QgsApplication

    plugin = geochange.classFactory(None)
    plugin.initProcessing()
    yield QgsApplication.processingRegistry().providerById("geochange")
    plugin.unload()


# A 256x256 window of the LEVIR-CD tile with 27 % changed pixels (rows 512-767, columns 256-511).
CROP = {"col_off": 256, "row_off": 512, "width": 256, "height": 256}


@pytest.fixture(scope="session")
def levir_crop(shared_data, tmp_path_factory) -> dict:
    """``pre``, ``post``, ``label``: GeoTIFF crops of the georeferenced LEVIR-CD tile (EPSG:4326)."""
    import rasterio
    from rasterio.windows import Window

    folder = tmp_path_factory.mktemp("levir_crop")
    window = Window(**CROP)
    paths = {}
    for name in ("pre", "post", "label"):
        with rasterio.open(shared_data / "levir_tile_georef" / f"{name}.tif") as src:
            profile = dict(src.profile, width=window.width, height=window.height,
                           transform=src.window_transform(window))
            paths[name] = folder / f"{name}.tif"
            with rasterio.open(paths[name], "w", **profile) as dst:
                dst.write(src.read(window=window))
    return paths


def run_algorithm(algorithm: str, parameters: dict, feedback=None, load: bool = False) -> dict:
    """``processing.run`` (or ``runAndLoadResults`` when ``load``, as the toolbox does) with its own
    context; raises QgsProcessingException as QGIS does."""
    import processing
    from qgis.core import QgsProcessingContext, QgsProcessingFeedback, QgsProject

    feedback = feedback or QgsProcessingFeedback()
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    context.setFeedback(feedback)
    run = processing.runAndLoadResults if load else processing.run
    return run(algorithm, dict(parameters), feedback=feedback, context=context)


@pytest.fixture(scope="session")
def crop_detection(geochange_provider, levir_crop, tinycd_package, tmp_path_factory) -> dict:
    """``geochange:detectchanges`` on the crop, run as the toolbox runs it (outputs loaded into the
    project); its parameters, results and the names of the layers it added."""
    from qgis.core import QgsProject

    folder = tmp_path_factory.mktemp("crop_detection")
    parameters = {"PRE": str(levir_crop["pre"]), "POST": str(levir_crop["post"]), "MODEL": str(tinycd_package),
                  "DEVICE": "cpu", "TILE_SIZE": 128, "OVERLAP": 32, "BATCH_SIZE": 4,
                  "OUTPUT_PROBABILITY": str(folder / "probability.tif"), "OUTPUT_MASK": str(folder / "mask.tif"),
                  "OUTPUT_POLYGONS": str(folder / "changes.gpkg")}
    before = set(QgsProject.instance().mapLayers())
    results = run_algorithm("geochange:detectchanges", parameters, load=True)
    added = [QgsProject.instance().mapLayer(i) for i in set(QgsProject.instance().mapLayers()) - before]
    return {"parameters": parameters, "results": results, "layers": {layer.name(): layer for layer in added}}


# --- Accuracy assessment ---------------------------------------------------------------------------

def write_masked_raster(path, dtype="uint8"):
    """A 64 px one-band GeoTIFF of ``dtype`` (1 m pixels at 500000, 5000000 in EPSG:32633) whose internal mask band
    masks its columns from 50 on: no nodata value, no alpha band."""
    import numpy as np
    import rasterio
    from affine import Affine

    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(
            path, "w", driver="GTiff", width=64, height=64, count=1, dtype=dtype, crs="EPSG:32633",
            transform=Affine(1, 0, 500000, 0, -1, 5000000)) as dst:
        dst.write(np.full((1, 64, 64), 200, dtype))
        dst.write_mask(np.where(np.arange(64) < 50, 255, 0).astype(np.uint8)[None].repeat(64, axis=0))
    return path


def write_polygons(path, geometries: list[dict], epsg: int, layer_name: str = "reference"):
    """A GeoPackage layer of GeoJSON-like polygons in EPSG:``epsg`` (added to the file where it exists)."""
    from osgeo import ogr, osr

    ogr.UseExceptions()
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(epsg)
    srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    source = ogr.Open(str(path), 1) if Path(path).exists() else ogr.GetDriverByName("GPKG").CreateDataSource(str(path))
    layer = source.CreateLayer(layer_name, srs, ogr.wkbPolygon)
    for geometry in geometries:
        feature = ogr.Feature(layer.GetLayerDefn())
        feature.SetGeometry(ogr.CreateGeometryFromJson(json.dumps(geometry)))
        layer.CreateFeature(feature)
    source = None
    return path


@pytest.fixture(scope="session")
def levir_maps(shared_data, tmp_path_factory) -> dict:
    """The tile's label; a detect-style mask made from it (one object erased, a false square, a nodata
    strip); the label as polygons in Web Mercator (the label is in EPSG:4326)."""
    import numpy as np
    import rasterio
    from rasterio.features import shapes
    from rasterio.warp import transform_geom

    from geochange.engine.contracts import MASK_CHANGE, MASK_NODATA

    folder = tmp_path_factory.mktemp("assess")
    label_path = shared_data / "levir_tile_georef" / "label.tif"
    with rasterio.open(label_path) as src:
        profile, label, crs, transform = src.profile, src.read(1), src.crs, src.transform
    mask = np.where(label > 0, MASK_CHANGE, 0).astype(np.uint8)
    rows, cols = np.nonzero(label)
    mask[max(rows[0] - 20, 0):rows[0] + 20, max(cols[0] - 20, 0):cols[0] + 20] = 0  # an object (partly) missed
    mask[40:70, 40:70] = MASK_CHANGE  # a false detection, if the label has no change there
    mask[:, -16:] = MASK_NODATA
    with rasterio.open(folder / "mask.tif", "w", **dict(profile, nodata=MASK_NODATA)) as dst:
        dst.write(mask, 1)
    geometries = [transform_geom(crs, "EPSG:3857", g) for g, v in shapes(label, label > 0, transform=transform)]
    return {"label": label_path, "label_array": label, "mask": folder / "mask.tif", "mask_array": mask,
            "polygons": write_polygons(folder / "reference.gpkg", geometries, 3857), "folder": folder}


# Fiji across the antimeridian: 0.2° x 0.1° at 17° S, in degrees east of 180° (as GDAL keeps them), in degrees
# west of -180°, and in UTM zone 1 south, whose 25 x 12.5 km cover the same place.
FIJI_EAST = ("EPSG:4326", Affine(0.0005, 0, 179.9, 0, -0.0005, -16.9), 400, 200)
FIJI_WEST = ("EPSG:4326", Affine(0.0005, 0, -180.1, 0, -0.0005, -16.9), 400, 200)
FIJI_UTM = ("EPSG:32701", Affine(50, 0, 169716.64, 0, -50, 8128908.16), 500, 250)


def write_constant(path, place, value):
    """A 3-band uint8 GeoTIFF at ``place`` (one of the places above), every pixel ``value``."""
    import numpy as np
    import rasterio

    crs, transform, width, height = place
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8", crs=crs,
                       transform=transform) as dst:
        dst.write(np.full((3, height, width), value, np.uint8))
    return path
