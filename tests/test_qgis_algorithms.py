"""The other GeoChange algorithms (vectorise, train, evaluate, model information) in a real headless QGIS
and through qgis_process, and Detect changes inside a Processing model run by qgis_process."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

pytest.importorskip("qgis.core", reason="QGIS Python bindings are not installed")
from osgeo import ogr  # noqa: E402
from qgis.core import (  # noqa: E402
    QgsPalettedRasterRenderer,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingModelAlgorithm,
    QgsProcessingModelChildAlgorithm,
    QgsProcessingModelChildParameterSource,
    QgsProcessingModelOutput,
    QgsProcessingModelParameter,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsRasterLayer,
    QgsVectorLayer,
)

from conftest import run_algorithm  # noqa: E402
from geochange.engine.contracts import PAIR_DONE, PAIR_FAILED, PAIR_PENDING, PAIR_SKIPPED  # noqa: E402
from geochange.engine.zoo import zoo_index  # noqa: E402

ogr.UseExceptions()


def polygon_areas(path) -> list[float]:
    source = ogr.Open(str(path))
    return sorted(f.GetField("area_m2") for f in source.GetLayer(0))


def read_csv(path) -> dict:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return {row[0]: row[1:] for row in rows[1:]}


@pytest.fixture(scope="module")
def small_dataset(shared_data, tmp_path_factory) -> Path:
    """Two pairs of the LEVIR-CD samples as a folder dataset (links to the shared files)."""
    root = tmp_path_factory.mktemp("levir_two")
    names = sorted(p.name for p in (shared_data / "levir_cd" / "label").iterdir())[:2]
    for folder in ("A", "B", "label"):
        (root / folder).mkdir()
        for name in names:
            (root / folder / name).symlink_to(shared_data / "levir_cd" / folder / name)
    return root


def test_every_algorithm_is_registered_with_a_complete_help(geochange_provider):
    ids = {a.id() for a in geochange_provider.algorithms()}
    assert ids == {"geochange:detectchanges", "geochange:detectmanypairs", "geochange:vectorizechanges",
                   "geochange:trainmodel", "geochange:evaluatemodel", "geochange:modelinfo",
                   "geochange:assessaccuracy", "geochange:setupengine"}
    for algorithm in geochange_provider.algorithms():
        text = algorithm.shortHelpString()
        assert len(text) > 300
        for definition in [*algorithm.parameterDefinitions(), *algorithm.outputDefinitions()]:
            assert f"<code>{definition.name()}</code>" in text, (algorithm.id(), definition.name())
        assert algorithm.group() and not algorithm.icon().isNull()
        # A Processing model or qgis_process names an output as a parameter: none may take another's name (outputs
        # of destination parameters are theirs).
        inputs = {p.name() for p in algorithm.parameterDefinitions() if not p.isDestination()}
        assert not inputs & {o.name() for o in algorithm.outputDefinitions()}, algorithm.id()
    # Evaluate's option PRECISION (the arithmetic) and its output PRECISION_SCORE each have their own help.
    text = geochange_provider.algorithm("evaluatemodel").shortHelpString()
    option, output = (text.split(f"<code>{name}</code>")[1].split("</dd>")[0] for name in ("PRECISION",
                                                                                             "PRECISION_SCORE"))
    assert "bf16" in option and "Default: <i>auto</i>" in option
    assert "Global change-class precision" in output and "bf16" not in output and "Default" not in output


# --- Vectorise change probability ------------------------------------------------------------------

def test_vectorize_at_the_model_threshold_gives_detect_s_polygons(crop_detection, tmp_path):
    detected = crop_detection["results"]
    results = run_algorithm("geochange:vectorizechanges", {
        "INPUT": detected["OUTPUT_PROBABILITY"], "THRESHOLD": 0.5, "OUTPUT": str(tmp_path / "same.gpkg")})
    assert results["POLYGON_COUNT"] == detected["POLYGON_COUNT"]
    assert polygon_areas(results["OUTPUT"]) == pytest.approx(polygon_areas(detected["OUTPUT_POLYGONS"]), rel=1e-9)

    stricter = run_algorithm("geochange:vectorizechanges", {
        "INPUT": detected["OUTPUT_PROBABILITY"], "THRESHOLD": 0.9, "MIN_AREA": 20.0,
        "OUTPUT": str(tmp_path / "strict.gpkg")})
    assert 0 < stricter["CHANGED_AREA_M2"] < detected["CHANGED_AREA_M2"]
    assert min(polygon_areas(stricter["OUTPUT"])) >= 20.0


def test_vectorize_through_qgis_process(qgis_process, crop_detection, tmp_path):
    probability = crop_detection["results"]["OUTPUT_PROBABILITY"]
    in_qgis = run_algorithm("geochange:vectorizechanges", {
        "INPUT": probability, "THRESHOLD": 0.7, "SIMPLIFY": 1.0, "OUTPUT": str(tmp_path / "a.gpkg")})
    done = qgis_process("--json", "run", "geochange:vectorizechanges", "--", f"INPUT={probability}",
                        "THRESHOLD=0.7", "SIMPLIFY=1.0", f"OUTPUT={tmp_path / 'b.gpkg'}")
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(done.stdout)["results"]
    assert results["POLYGON_COUNT"] == in_qgis["POLYGON_COUNT"] > 0
    assert polygon_areas(tmp_path / "b.gpkg") == pytest.approx(polygon_areas(tmp_path / "a.gpkg"))
    # Opened later, the polygons qgis_process wrote are styled as the toolbox loads them (the style beside them).
    polygons = QgsVectorLayer(str(tmp_path / "b.gpkg"))
    assert polygons.labelsEnabled() and "area_m2" in polygons.labeling().settings().fieldName


# --- Model information -----------------------------------------------------------------------------

def test_model_information_in_qgis_and_qgis_process(geochange_provider, qgis_process, tinycd_package, tmp_path):
    results = run_algorithm("geochange:modelinfo", {"MODEL": str(tinycd_package), "OUTPUT": str(tmp_path / "i.html")})
    assert (results["ARCHITECTURE"], results["THRESHOLD"]) == ("tinycd", 0.5)
    page = (tmp_path / "i.html").read_text(encoding="utf-8")
    assert "<td>architecture</td><td>tinycd</td>" in page
    assert "<td>inputs.pre.bands</td><td>3</td>" in page and "<td>output.activation</td><td>sigmoid</td>" in page
    assert "architecture_info.description" in page  # the registry's description of the architecture

    done = qgis_process("--json", "run", "geochange:modelinfo", "--", f"MODEL={tinycd_package}",
                        f"OUTPUT={tmp_path / 'i.csv'}")
    assert done.returncode == 0, done.stdout + done.stderr
    table = read_csv(tmp_path / "i.csv")
    assert table["architecture"] == ["tinycd"] and table["inputs.post.modality"] == ["optical"]
    assert table["output.threshold"] == ["0.5"] and table["training.dataset"] == ["LEVIR-CD"]


# --- Evaluate a model ------------------------------------------------------------------------------

def test_evaluate_in_qgis_and_qgis_process(geochange_provider, qgis_process, tinycd_package, small_dataset,
                                           tmp_path):
    results = run_algorithm("geochange:evaluatemodel", {
        "MODEL": str(tinycd_package), "DATA": str(small_dataset), "DEVICE": "cpu", "OUTPUT": str(tmp_path / "m.html")})
    assert results["IMAGES"] == 2 and results["F1"] > 0.8
    assert results["IOU"] == pytest.approx(results["F1"] / (2 - results["F1"]))  # IoU = F1 / (2 - F1)
    page = (tmp_path / "m.html").read_text(encoding="utf-8")
    assert f"<td>f1</td><td>change-class F1</td><td>{results['F1']:.6g}</td>" in page

    done = qgis_process("--json", "run", "geochange:evaluatemodel", "--", f"MODEL={tinycd_package}",
                        f"DATA={small_dataset}", "DEVICE=cpu", f"OUTPUT={tmp_path / 'm.csv'}")
    assert done.returncode == 0, done.stdout + done.stderr
    table = read_csv(tmp_path / "m.csv")
    assert float(table["f1"][1]) == pytest.approx(results["F1"], abs=1e-5)
    counts = {k: int(table[k][1]) for k in ("tp", "fp", "fn", "tn")}
    assert sum(counts.values()) == 2 * 256 * 256
    precision = counts["tp"] / (counts["tp"] + counts["fp"])
    assert float(table["precision"][1]) == pytest.approx(precision, abs=1e-5)


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # the dataset's PNGs
def test_evaluate_leaves_out_the_ignore_value_and_names_its_parameter(geochange_provider, tinycd_package,
                                                                      small_dataset, tmp_path):
    """A 0/1 label with 255 where nothing is labelled: refused without IGNORE_VALUE (named so, not as the
    command line's option), counted on the labelled pixels only with it."""
    import numpy as np
    import rasterio

    name = sorted(p.name for p in (small_dataset / "label").iterdir())[0]
    sparse = tmp_path / "sparse"
    for folder in ("A", "B", "label"):
        (sparse / folder).mkdir(parents=True)
    for folder in ("A", "B"):
        (sparse / folder / name).symlink_to(small_dataset / folder / name)
    with rasterio.open(small_dataset / "label" / name) as src:
        profile, label = src.profile, (src.read(1) > 0).astype(np.uint8)
    label[:, :100] = 255
    with rasterio.open(sparse / "label" / name, "w", **profile) as dst:
        dst.write(label, 1)
    parameters = {"MODEL": str(tinycd_package), "DATA": str(sparse), "DEVICE": "cpu", "OUTPUT": str(tmp_path / "m.csv")}
    with pytest.raises(QgsProcessingException) as refused:
        run_algorithm("geochange:evaluatemodel", parameters)
    assert str(refused.value) == (f"{sparse / 'label' / name}: label values 0, 1, 255; a label must be 0 (no change) "
                                  "and 1 or 255 (change); if 255 marks unlabelled pixels, give IGNORE_VALUE 255")
    results = run_algorithm("geochange:evaluatemodel", {**parameters, "IGNORE_VALUE": 255})
    table = read_csv(tmp_path / "m.csv")
    assert results["IMAGES"] == 1 and sum(int(table[k][1]) for k in ("tp", "fp", "fn", "tn")) == 256 * 156


# --- Detect changes in many pairs ------------------------------------------------------------------

def test_detect_many_s_summary_opens_styled_later(geochange_provider, levir_crop, tinycd_package, tmp_path):
    """The summary of a run whose outputs are not loaded opens with each footprint outlined by its status."""
    for date in ("pre", "post"):
        (tmp_path / date).mkdir()
        (tmp_path / date / "levir.tif").symlink_to(levir_crop[date])
    results = run_algorithm("geochange:detectmanypairs", {
        "MODEL": str(tinycd_package), "PRE_FOLDER": str(tmp_path / "pre"), "POST_FOLDER": str(tmp_path / "post"),
        "DEVICE": "cpu", "WORKERS": 1, "THREADS": 1, "OUTPUT": str(tmp_path / "out")})
    assert results["DONE"] == 1 and (tmp_path / "out" / "summary.qml").is_file()
    summary = QgsVectorLayer(results["SUMMARY"])  # kept in a name: it owns its renderer
    renderer = summary.renderer()
    assert (renderer.type(), renderer.classAttribute()) == ("categorizedSymbol", "status")
    assert [c.value() for c in renderer.categories()] == [PAIR_DONE, PAIR_SKIPPED, PAIR_FAILED, PAIR_PENDING]


# --- Assess change accuracy ------------------------------------------------------------------------

def test_assess_against_a_raster_and_a_polygon_layer_gives_the_engine_s_figures(geochange_provider, levir_maps,
                                                                              tmp_path):
    from qgis.core import QgsProject

    from geochange.engine.assess import assess

    names = {"F1": "f1", "IOU": "iou", "KAPPA": "kappa", "PRECISION_SCORE": "precision", "RECALL": "recall",
             "OA": "oa"}
    polygons = QgsVectorLayer(str(levir_maps["polygons"]), "reference", "ogr")
    for reference, engine_reference in ((str(levir_maps["label"]), str(levir_maps["label"])),
                                        (polygons, f"{levir_maps['polygons']}|layername=reference")):
        folder = tmp_path / polygons.name() if reference is polygons else tmp_path / "raster"
        before = set(QgsProject.instance().mapLayers())
        results = run_algorithm("geochange:assessaccuracy", {
            "PREDICTION": str(levir_maps["mask"]), "REFERENCE": reference, "OUTPUT": str(folder / "accuracy.csv"),
            "OUTPUT_RASTER": str(folder / "tpfpfn.tif")}, load=True)
        engine = assess(str(levir_maps["mask"]), engine_reference)
        assert {name: results[name] for name in names} == pytest.approx(
            {name: engine["global"][key] for name, key in names.items()})
        table = read_csv(folder / "accuracy.csv")
        assert int(table["fp"][1]) == engine["confusion"]["fp"]
        assert int(table["objects.found"][1]) == engine["objects"]["found"]
        added = [QgsProject.instance().mapLayer(i) for i in set(QgsProject.instance().mapLayers()) - before]
        assert [type(layer.renderer()) for layer in added] == [QgsPalettedRasterRenderer]


def test_assess_reads_a_filtered_layer_as_it_shows(geochange_provider, levir_maps, tmp_path):
    """A reference filtered in QGIS's query builder is the features it shows, not every feature of its file. (A
    GeoPackage's raster table, refused: test_qgis_processing.)"""
    from osgeo import gdal

    from geochange.engine.assess import assess

    polygons = QgsVectorLayer(str(levir_maps["polygons"]), "reference", "ogr")
    assert polygons.setSubsetString("fid <= 10") and polygons.featureCount() == 10
    results = run_algorithm("geochange:assessaccuracy", {
        "PREDICTION": str(levir_maps["mask"]), "REFERENCE": polygons, "OUTPUT": str(tmp_path / "accuracy.csv"),
        "OUTPUT_RASTER": str(tmp_path / "tpfpfn.tif")})
    # The features shown, written by GDAL (the dataset returned is dropped, so closed, at once).
    gdal.VectorTranslate(str(tmp_path / "shown.gpkg"), str(levir_maps["polygons"]), where="fid <= 10")
    engine = assess(str(levir_maps["mask"]), str(tmp_path / "shown.gpkg"))
    everything = assess(str(levir_maps["mask"]), str(levir_maps["polygons"]))
    assert engine["confusion"]["tp"] < everything["confusion"]["tp"]
    # Not loaded, the TP/FP/FN raster still opens in its colours (its style saved beside it).
    agreement = QgsRasterLayer(str(tmp_path / "tpfpfn.tif"))
    renderer = agreement.renderer()
    assert isinstance(renderer, QgsPalettedRasterRenderer) and [c.value for c in renderer.classes()] == [1, 2, 3]
    names = {"PRECISION_SCORE": "precision", "RECALL": "recall", "F1": "f1"}
    assert {name: results[name] for name in names} == pytest.approx(
        {name: engine["global"][key] for name, key in names.items()})


def test_a_user_defined_crs_reaches_the_engine_as_its_definition(geochange_provider):
    """QGIS's id of a custom CRS (USER:100000) means nothing to GDAL."""
    from qgis.core import QgsApplication, QgsCoordinateReferenceSystem, QgsProcessingContext
    from rasterio.crs import CRS

    from geochange.qgis_plugin.parameters import option_value

    custom = QgsCoordinateReferenceSystem.fromProj("+proj=tmerc +lat_0=0 +lon_0=13.5 +k=0.9996 +x_0=500000 "
                                                   "+y_0=0 +datum=WGS84 +units=m +no_defs")
    assert QgsApplication.createDatabase()  # the profile's CRS database, where a user's CRS is kept
    assert custom.saveAsUserCrs("survey grid") > 0 and custom.authid().startswith("USER:")
    algorithm = QgsApplication.processingRegistry().createAlgorithmById("geochange:detectchanges")
    value = option_value(algorithm, {"CRS": custom}, QgsProcessingContext(), "crs")
    assert not value.startswith("USER:") and CRS.from_user_input(value).to_dict()["lon_0"] == 13.5
    utm = QgsCoordinateReferenceSystem("EPSG:32633")
    assert option_value(algorithm, {"CRS": utm}, QgsProcessingContext(), "crs") == "EPSG:32633"


# --- Train a model ---------------------------------------------------------------------------------

SMOKE_CONFIG = """\
# TinyCD on the LEVIR-CD samples for a few iterations on 128 px crops: a smoke run.
name: tinycd_smoke
device: cpu
model: {{architecture: tinycd}}
data:
  datasets:
    - root: {root}
      split: {{val: 0.2, test: 0.2, seed: 0}}
  batch: 2
  workers: 0
augment: {{crop: {{size: 128}}}}
loss: {{ohem: null}}
schedule: {{iterations: 100, warmup: 0}}
train: {{val_interval: 50, log_interval: 1, tensorboard: false, amp: "off"}}
test: {{tta: false}}
"""


def manifest_of(package: Path) -> dict:
    from geochange.engine.package import read_manifest

    return read_manifest(package)


class Recorder(QgsProcessingFeedback):
    def __init__(self):
        super().__init__()
        self.infos, self.progress = [], []
        self.progressChanged.connect(self.progress.append)

    def pushInfo(self, text):  # noqa: N802 (QGIS's name)
        self.infos.append(text)


def test_train_in_qgis_then_resume_through_qgis_process(geochange_provider, qgis_process, shared_data, tmp_path):
    config = tmp_path / "configs" / "smoke.yaml"
    config.parent.mkdir()
    config.write_text(SMOKE_CONFIG.format(root=shared_data / "levir_cd"))
    feedback = Recorder()
    results = run_algorithm("geochange:trainmodel", {
        "CONFIG": str(config), "OVERRIDES": "schedule.iterations=2\n# validate at the end only\ntrain.val_interval=2",
        "OUTPUT": str(tmp_path / "smoke.safetensors")}, feedback)
    # The run's folder defaults to runs/<name> beside the config; the package is its best one.
    work = config.parent / "runs" / "tinycd_smoke"
    assert Path(results["WORK_FOLDER"]) == work
    assert results["BEST_ITERATION"] == 2 and 0 <= results["VAL_MIOU"] <= 1 and 0 <= results["TEST_F1"] <= 1
    manifest = manifest_of(tmp_path / "smoke.safetensors")
    assert manifest["architecture"] == "tinycd"
    assert manifest["training"]["config"]["schedule"]["iterations"] == 2  # the override reached the trainer
    # Progress and lines come from the run's logs.
    assert feedback.progress and feedback.progress[-1] == 100
    assert any(line.startswith("iteration 2/2: lr") and "loss" in line for line in feedback.infos), feedback.infos
    assert any(line.startswith("validation 2/2: mIoU") for line in feedback.infos), feedback.infos

    # One more iteration from the checkpoint, through qgis_process (overrides separated by ";").
    done = qgis_process("--json", "run", "geochange:trainmodel", "--", f"CONFIG={config}", "RESUME=true",
                        "OVERRIDES=schedule.iterations=3;train.val_interval=3", f"WORK_DIR={work}",
                        f"OUTPUT={tmp_path / 'smoke3.safetensors'}")
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(done.stdout)["results"]
    assert results["BEST_ITERATION"] in (2, 3) and Path(results["WORK_FOLDER"]) == work  # best validation mIoU
    assert manifest_of(tmp_path / "smoke3.safetensors")["training"]["iteration"] == results["BEST_ITERATION"]
    with open(work / "train_log.csv", newline="") as f:
        assert [row["iteration"] for row in csv.DictReader(f)] == ["1", "2", "3"]  # resumed, not restarted

    # Started afresh there, it is refused before anything of the finished run goes, unless told to replace it.
    kept = (work / "best.safetensors").read_bytes()
    with pytest.raises(QgsProcessingException, match="holds an earlier run .*continue it with RESUME, replace it "
                                                     "with RESTART"):
        run_algorithm("geochange:trainmodel", {"CONFIG": str(config), "OVERRIDES": "schedule.iterations=1",
                                               "OUTPUT": str(tmp_path / "again.safetensors")})
    assert (work / "best.safetensors").read_bytes() == kept and (work / "results.json").is_file()


def test_the_train_dialog_offers_the_registry_s_architectures(geochange_provider):
    from geochange.engine.architectures import architecture_names
    from geochange.engine.models import list_models
    from geochange.qgis_plugin.train_algorithm import FROM_START

    assert architecture_names() == tuple(list_models())  # read from the source without torch: the registry's
    algorithm = geochange_provider.algorithm("trainmodel")
    assert algorithm.parameterDefinition("ARCHITECTURE").options() == [FROM_START, *list_models()]


def test_train_from_the_dialog_without_a_configuration(geochange_provider, small_dataset, tmp_path):
    """Dataset folder, architecture, iterations, crop and batch: the trainer's defaults do the rest, and the
    package is one the engine loads, recording what the dialog chose."""
    from geochange.engine.package import load_package

    dialog = {"DATASET": str(small_dataset), "VAL_SHARE": 0.5, "ARCHITECTURE": "tinycd", "ITERATIONS": 2,
              "CROP_SIZE": 72, "BATCH_SIZE": 2, "OVERRIDES": "data.workers=0",
              "OUTPUT": str(tmp_path / "mine.safetensors")}
    for left_out in ("DATASET", "ITERATIONS", "ARCHITECTURE"):  # refused at once, naming what is missing
        with pytest.raises(QgsProcessingException, match=r"Without a training configuration \(CONFIG\), give a "
                                                         r"dataset \(DATASET\), the ITERATIONS, and an ARCHITECTURE"):
            run_algorithm("geochange:trainmodel", {k: v for k, v in dialog.items() if k != left_out})
    # A file whose manifest is no model's (a JSON string; no inputs): named, not a TypeError or KeyError.
    import numpy as np
    import safetensors.numpy

    from geochange.qgis_plugin.train_algorithm import FROM_START

    for name, manifest in (("text", '"architecture"'), ("bare", '{"architecture": "tinycd"}')):
        model = tmp_path / f"{name}.safetensors"
        safetensors.numpy.save_file({"w": np.zeros(1, np.float32)}, str(model), metadata={"geochange": manifest})
        with pytest.raises(QgsProcessingException, match=f"MODEL: .*{name}.safetensors is no model package"):
            run_algorithm("geochange:trainmodel", {**dialog, "ARCHITECTURE": FROM_START, "MODEL": str(model)})
    results = run_algorithm("geochange:trainmodel", dialog)
    assert results["BEST_ITERATION"] in (1, 2) and Path(results["WORK_FOLDER"]) == tmp_path / "runs" / "mine"
    package = load_package(tmp_path / "mine.safetensors")
    manifest = package.manifest
    assert manifest["architecture"] == "tinycd" and manifest["tile"] == 72
    config = manifest["training"]["config"]
    assert (config["name"], config["schedule"]["iterations"], config["schedule"]["warmup"], config["data"]["batch"],
            config["augment"]["crop"]["size"]) == ("mine", 2, 0, 2, 72)
    # Validated, and checkpointed, every tenth of the run (at least every iteration): a cancel keeps one.
    assert (config["train"]["val_interval"], config["train"]["checkpoint_interval"]) == (1, 1)
    assert config["data"]["datasets"] == [{"root": str(small_dataset), "split": {"val": 0.5, "seed": 0}}]
    assert (manifest["training"]["data"]["train"], manifest["training"]["data"]["val"]) == (1, 1)


def test_the_dialog_s_relative_paths_intervals_and_flags(geochange_provider, small_dataset, tmp_path, monkeypatch):
    """Relative paths are the working folder's, though the trainer runs in another (the package's); a package
    into a folder not made yet; a run validated and checkpointed often enough that a cancel keeps a checkpoint;
    the trainer's --resume named as the dialog's RESUME."""
    from qgis.core import QgsProcessingContext

    from geochange.trainer.config import ConfigError
    from geochange.trainer.worker import run_train

    monkeypatch.chdir(small_dataset.parent)
    algorithm = geochange_provider.algorithm("trainmodel")
    overrides = algorithm.dialog_overrides({"DATASET": small_dataset.name, "VAL_SHARE": 0.5, "ARCHITECTURE": "tinycd",
                                            "ITERATIONS": 50, "OUTPUT": "mine.safetensors"}, QgsProcessingContext())
    assert "train.val_interval=5" in overrides and "schedule.warmup=5" in overrides
    assert f'data.datasets=[{{"root": "{small_dataset}", "split": {{"val": 0.5, "seed": 0}}}}]' in overrides
    assert algorithm.parameter_flags()["--resume"] == "RESUME"
    overrides = [o for o in overrides if not o.startswith("schedule.")]
    monkeypatch.chdir(tmp_path)
    result = run_train({"overrides": [*overrides, "schedule.iterations=1", "schedule.warmup=0", "data.workers=0",
                                      "augment.crop.size=72", "data.batch=2"],
                        "package": "new/mine.safetensors", "work_dir": "work"}, lambda line: None)
    assert result["package"] == str(tmp_path / "new" / "mine.safetensors") and Path(result["package"]).is_file()
    assert result["work_dir"] == str(tmp_path / "work") and (tmp_path / "work" / "last.pt").is_file()
    with pytest.raises(ConfigError, match="augment.crop.size"):  # refused before the package's folder is made
        run_train({"overrides": [*overrides, "augment.crop.size=64"], "package": "refused/mine.safetensors"},
                  lambda line: None)
    assert not (tmp_path / "refused").exists()


def test_fine_tune_a_zoo_model_from_the_dialog(geochange_provider, shared_data, tmp_path):
    """A zoo model to start from gives the architecture and its inputs (here an optical-SAR pair)."""
    from geochange.engine.package import load_package
    from geochange.engine.zoo import zoo_path

    if "tinycd_flood" not in zoo_index():
        pytest.skip("the zoo has no tinycd_flood")
    tiles = shared_data / "ombria_full" / "test"
    root = tmp_path / "floods"
    for folder in ("A", "B", "label"):
        (root / folder).mkdir(parents=True)
        for name in sorted(p.name for p in (tiles / "A").iterdir())[:3]:
            (root / folder / name).symlink_to(tiles / folder / name)
    results = run_algorithm("geochange:trainmodel", {
        "DATASET": str(root), "VAL_SHARE": 0.34, "ZOO_MODEL": "tinycd_flood", "ITERATIONS": 1, "CROP_SIZE": 72,
        "BATCH_SIZE": 2, "OVERRIDES": "data.workers=0", "OUTPUT": str(tmp_path / "floods.safetensors")})
    assert results["BEST_ITERATION"] == 1
    manifest = load_package(tmp_path / "floods.safetensors").manifest
    assert manifest["architecture"] == "tinycd"
    assert manifest["inputs"]["post"]["modality"] == "sar" and manifest["inputs"]["post"]["replicate"] == 3
    assert manifest["training"]["config"]["model"]["init"] == str(zoo_path("tinycd_flood").resolve())


# --- Inside a Processing model ---------------------------------------------------------------------

def set_sources(child: QgsProcessingModelChildAlgorithm, sources: dict) -> None:
    # One parameter at a time: setParameterSources() with a whole dict segfaults in PyQGIS 3.22.
    for name, value in sources.items():
        child.addParameterSources(name, [value])


def detect_then_vectorize_model(path: Path) -> Path:
    """A model: Detect changes on two raster inputs, then Vectorise its probability at a threshold
    given as a model input; the polygons of the second step are the model's output."""
    source = QgsProcessingModelChildParameterSource
    model = QgsProcessingModelAlgorithm("Detect then re-threshold", "GeoChange tests")
    for parameter in (QgsProcessingParameterRasterLayer("pre", "Pre"),
                      QgsProcessingParameterRasterLayer("post", "Post"), QgsProcessingParameterFile("model", "Model"),
                      QgsProcessingParameterNumber("threshold", "Threshold", QgsProcessingParameterNumber.Double, 0.8)):
        model.addModelParameter(parameter, QgsProcessingModelParameter(parameter.name()))

    detect = QgsProcessingModelChildAlgorithm("geochange:detectchanges")
    detect.setChildId("detect")
    set_sources(detect, {
        "PRE": source.fromModelParameter("pre"), "POST": source.fromModelParameter("post"),
        "MODEL": source.fromModelParameter("model"), "DEVICE": source.fromStaticValue("cpu"),
        # The tiling of ``crop_detection``, so that both runs give the same probabilities.
        "TILE_SIZE": source.fromStaticValue(128), "OVERLAP": source.fromStaticValue(32)})
    model.addChildAlgorithm(detect)

    vectorize = QgsProcessingModelChildAlgorithm("geochange:vectorizechanges")
    vectorize.setChildId("vectorize")
    set_sources(vectorize, {"INPUT": source.fromChildOutput("detect", "OUTPUT_PROBABILITY"),
                            "THRESHOLD": source.fromModelParameter("threshold")})
    output = QgsProcessingModelOutput("polygons")
    output.setChildOutputName("OUTPUT")
    vectorize.setModelOutputs({"polygons": output})
    model.addChildAlgorithm(vectorize)
    assert model.toFile(str(path))
    return path


def test_algorithms_inside_a_model_run_by_qgis_process(geochange_provider, qgis_process, levir_crop, tinycd_package,
                                                       crop_detection, tmp_path):
    model = detect_then_vectorize_model(tmp_path / "detect_then_vectorize.model3")
    loaded = QgsProcessingModelAlgorithm()
    assert loaded.fromFile(str(model)) and loaded.childAlgorithm("detect").algorithm() is not None
    assert "vectorize:polygons" in {p.name() for p in loaded.parameterDefinitions()}

    polygons = tmp_path / "model_polygons.gpkg"
    done = qgis_process("--json", "run", str(model), "--", f"pre={levir_crop['pre']}", f"post={levir_crop['post']}",
                        f"model={tinycd_package}", "threshold=0.8", f"vectorize:polygons={polygons}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert polygons.exists()
    # The model's polygons are what vectorising the same probability at 0.8 gives.
    expected = run_algorithm("geochange:vectorizechanges", {
        "INPUT": crop_detection["results"]["OUTPUT_PROBABILITY"], "THRESHOLD": 0.8,
        "OUTPUT": str(tmp_path / "expected.gpkg")})
    assert polygon_areas(polygons) == pytest.approx(polygon_areas(expected["OUTPUT"]), rel=1e-6)


def test_a_model_from_the_zoo_or_a_file_is_needed(geochange_provider, levir_crop, tmp_path):
    parameters = {"PRE": str(levir_crop["pre"]), "POST": str(levir_crop["post"]),
                  "OUTPUT_PROBABILITY": str(tmp_path / "p.tif"), "OUTPUT_MASK": str(tmp_path / "m.tif"),
                  "OUTPUT_POLYGONS": str(tmp_path / "c.gpkg")}
    with pytest.raises(QgsProcessingException, match=r"zoo \(ZOO_MODEL\) or give a model file \(MODEL\)"):
        run_algorithm("geochange:detectchanges", parameters)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", sorted(zoo_index()) or [pytest.param(None, marks=pytest.mark.skip("zoo/ is empty"))])
def test_each_zoo_model_in_qgis_on_plain_tiles(name, geochange_provider, shared_data, tmp_path):
    """A zoo model chosen by name (ZOO_MODEL) on an OMBRIA test tile pair, paired pixel for pixel, in the
    window its package records (TILE_SIZE left empty)."""
    tiles = shared_data / "ombria_full" / "test"
    tile = sorted(p.name for p in (tiles / "A").iterdir())[0]
    results = run_algorithm("geochange:detectchanges", {
        "PRE": str(tiles / "A" / tile), "POST": str(tiles / "B" / tile), "ZOO_MODEL": name, "DEVICE": "cpu",
        "OUTPUT_PROBABILITY": str(tmp_path / "p.tif"), "OUTPUT_MASK": str(tmp_path / "m.tif"),
        "OUTPUT_POLYGONS": str(tmp_path / "c.gpkg")})
    assert results["POLYGON_COUNT"] > 0 and all((tmp_path / f).is_file() for f in ("p.tif", "m.tif", "c.gpkg"))
