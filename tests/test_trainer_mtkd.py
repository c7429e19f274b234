"""MTKD: CAR routing at the boundaries as methods.md says, the distillation term's effect on the student's
gradients, frozen teachers, the student's start from M_O, the router package, and the pipeline end to end
on real pairs (TinyCD, LEVIR-CD + DSIFN, 2 iterations a step), its broken files and empty partitions refused
before anything is removed or trained."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn as nn

from geochange.engine.models import create
from geochange.engine.package import load_package, load_router, read_manifest, save_package
from geochange.engine.routing import change_area_ratio, route
from geochange.trainer.config import ConfigError, derive
from geochange.trainer.data import IGNORE
from geochange.trainer.evaluation import predictor_for, whole_image
from geochange.trainer.loop import Trainer
from geochange.trainer.mtkd import Pipeline, TeacherRouter
from trainer_setup import first_batch, gradients, small_config


def test_training_routes_by_strict_thresholds_inference_by_inclusive_ones():
    car = torch.tensor([0.0, 0.0499, 0.05, 0.1999, 0.2, 0.7], dtype=torch.float64)
    assert route(car, [0.05, 0.2]).tolist() == [0, 0, 1, 1, 2, 2]  # training: CAR < t
    assert route(car, [0.05, 0.2], inclusive=True).tolist() == [0, 0, 0, 1, 1, 2]  # O-P test code: CAR <= t
    two = torch.tensor([0.1, 0.1001], dtype=torch.float64)
    assert route(two, [0.10]).tolist() == [1, 1]
    assert route(two, [0.10], inclusive=True).tolist() == [0, 1]


class _Constant(nn.Module):
    """A teacher whose logits say which teacher it is."""

    def __init__(self, value: float):
        super().__init__()
        self.value = nn.Parameter(torch.tensor(value))

    def forward(self, pre, post):
        return self.value.expand(pre.shape[0], 1, *pre.shape[-2:])


def test_each_sample_gets_the_teacher_of_its_ground_truth_car():
    labels = torch.zeros(4, 20, 20, dtype=torch.uint8)
    labels[0].view(-1)[:20] = 1  # CAR exactly 0.05 -> medium
    labels[1].view(-1)[:80] = 1  # CAR exactly 0.2 -> large
    labels[2].view(-1)[:19] = 1  # just under 0.05 -> small
    labels[3].view(-1)[:79] = 1  # just under 0.2 -> medium
    assert change_area_ratio(labels == 1, labels != IGNORE)[:2].tolist() == [0.05, 0.2]
    router = TeacherRouter([_Constant(0.0), _Constant(1.0), _Constant(2.0)], [0.05, 0.2])
    images = torch.zeros(4, 3, 20, 20)
    chosen = router(images, images, labels)[:, 0, 0, 0]
    assert chosen.tolist() == [1.0, 2.0, 0.0, 1.0]
    assert all(not t.training and not t.value.requires_grad for t in router.teachers)


def test_distillation_term_changes_the_student_gradients(shared_data, tmp_path):
    cfg = small_config(tmp_path, shared_data / "levir_cd", "changer_mit_b0")
    teachers = []
    for seed in range(3):
        torch.manual_seed(seed + 10)
        teachers.append(create("changer_mit_b0"))
    plain = Trainer(cfg)
    batch = first_batch(plain)
    reference = gradients(plain, batch)
    distilled = gradients(Trainer(cfg, teacher=TeacherRouter(teachers, [0.05, 0.2]), distill_weight=1e-4), batch)
    silent = gradients(Trainer(cfg, teacher=TeacherRouter(teachers, [0.05, 0.2]), distill_weight=0.0), batch)
    assert any(not torch.equal(distilled[n], reference[n]) for n in reference)
    assert all(torch.equal(silent[n], reference[n]) for n in reference)


@pytest.fixture(scope="module")
def pipeline(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("mtkd")
    cfg = small_config(root, shared_data / "levir_cd", "tinycd",
                       data={"datasets": [{"root": str(shared_data / d), "split": {"val": 0.2, "test": 0.2}}
                                          for d in ("levir_cd", "dsifn")]},
                       mtkd={"thresholds": [0.05, 0.2], "distill": {"schedule": {"iterations": 2}}})
    pipe = Pipeline(cfg)
    for step in ("partition", "original", "teachers"):
        getattr(pipe, step)()
    return pipe


def test_a_step_s_folder_not_made_by_the_pipeline_is_never_removed(pipeline, tmp_path):
    """A config's work_dir over someone's folder: its ``original/`` was removed as a stale step's output."""
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "thesis.txt").write_text("mine")
    with pytest.raises(ConfigError, match="original is in the way and was not made by this pipeline"):
        Pipeline({**pipeline.cfg, "work_dir": str(tmp_path)}).original()
    assert (tmp_path / "original" / "thesis.txt").read_text() == "mine"


def _copy(pipeline, tmp_path) -> Pipeline:
    """The module's pipeline in a folder of its own, for a test that breaks its files."""
    shutil.copytree(pipeline.root, tmp_path / "run")
    return Pipeline({**pipeline.cfg, "work_dir": str(tmp_path / "run")})


def test_an_unreadable_teacher_stops_the_steps_reading_it_before_they_remove_anything(pipeline, tmp_path):
    """A finished run whose teacher package was cut short: ``run`` removed the finished student (made from
    the teacher's old bytes) and only then failed to load the teacher; ``--restart`` left the teacher as done."""
    pipe = _copy(pipeline, tmp_path)
    later = {"distill": pipe.step_dir("distill") / "results.json", "router": pipe.root / "router.safetensors"}
    for key, out in later.items():
        pipe._begin(key)  # the later steps' outputs, on record as the pipeline's
        out.parent.mkdir(exist_ok=True)
        out.write_text("finished")
    teacher = pipe.step_dir("teacher", "small") / "best.safetensors"
    teacher.write_bytes(teacher.read_bytes()[:teacher.stat().st_size // 2])
    for step in (pipe.distill, pipe.router):
        with pytest.raises(ConfigError, match=r"teacher_small/best\.safetensors: not a valid safetensors file; it is "
                                              r"corrupt or truncated .*run `geochange mtkd teachers` \(a resumed run "
                                              r"puts back the package its checkpoint kept\)"):
            step()
    assert all(out.read_text() == "finished" for out in later.values())
    # The remedy the message names: the teachers step, resumed, puts back only the unreadable teacher's package.
    large = (pipe.step_dir("teacher", "large") / "best.safetensors").read_bytes()
    pipe.teachers()
    assert pipe.done("teachers") and read_manifest(teacher)["training"]["method"] == "mtkd-teacher-small"
    assert (pipe.step_dir("teacher", "large") / "best.safetensors").read_bytes() == large


def test_unreadable_records_are_named_with_what_to_do(pipeline, tmp_path):
    """A made_from.json or partitions.json cut short failed with a JSONDecodeError traceback."""
    pipe = _copy(pipeline, tmp_path)
    for name, remedy in (("made_from.json", "move them away"), ("partitions.json", "run `geochange mtkd partition`")):
        path = pipe.root / name
        text = path.read_text()
        path.write_text(text[:len(text) // 2])
        with pytest.raises(ConfigError, match=rf"{name} is not readable JSON \(.*\); .*{remedy}"):
            Pipeline(pipe.cfg).run()
        if name == "made_from.json":
            path.write_text(text)
    pipe.partition()
    assert (pipe.root / "partitions.json").read_text() == text and pipe.done("teachers")


def test_an_empty_partition_is_refused_before_any_step_trains(pipeline, tmp_path, monkeypatch):
    """No sample has a CAR of 0.99: ``run`` trained M_O before the teachers step refused the large partition."""
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("a step trained before the refusal"))
    pipe = Pipeline(derive(pipeline.cfg, {"work_dir": str(tmp_path), "mtkd": {"thresholds": [0.05, 0.99]}}))
    with pytest.raises(ConfigError, match=r"the large partition has no training sample \(.*partitions\.json\); "
                                          "change mtkd.thresholds"):
        pipe.run()
    assert not pipe.step_dir("original").exists()


def test_partitions_by_ground_truth_car(pipeline):
    parts = json.loads((pipeline.root / "partitions.json").read_text())
    assert parts["thresholds"] == [0.05, 0.2]
    train = {i.id: i for i in pipeline.splits["train"]}
    assert sorted(sum(parts["train"].values(), [])) == sorted(train)
    for name, bounds in (("small", (0, 0.05)), ("medium", (0.05, 0.2)), ("large", (0.2, 1.01))):
        assert parts["train"][name], name
        for item_id in parts["train"][name]:
            label = train[item_id].load()[2]
            assert bounds[0] <= float(change_area_ratio(label == 1, label != IGNORE)) < bounds[1]
    for name in ("small", "medium", "large"):
        manifest = read_manifest(pipeline.step_dir("teacher", name) / "best.safetensors")
        assert manifest["training"]["method"] == f"mtkd-teacher-{name}"
        assert manifest["training"]["data"]["train"] == len(parts["train"][name])


def test_student_starts_from_m_o_and_teachers_stay_frozen(pipeline):
    original = load_package(pipeline.step_dir("original") / "best.safetensors").model.state_dict()
    pipeline._begin("distill")  # as distill() does: the student's folder is then the pipeline's, on record
    trainer = pipeline.distill_trainer()
    assert trainer.distill_weight == 5e-3  # the authors' TinyCD value
    assert all(torch.equal(v, original[k]) for k, v in trainer.module.state_dict().items())
    before = [{k: v.clone() for k, v in t.state_dict().items()} for t in trainer.teacher.teachers]
    results = trainer.fit()
    assert results["test"] is not None
    for teacher, state in zip(trainer.teacher.teachers, before):
        assert all(torch.equal(v, state[k]) for k, v in teacher.state_dict().items())
    rows = (pipeline.step_dir("distill") / "train_log.csv").read_text().splitlines()
    assert rows[0].split(",")[:5] == ["iteration", "lr", "loss", "seg", "distill"]
    assert all(float(r.split(",")[4]) > 0 for r in rows[1:])
    assert read_manifest(pipeline.step_dir("distill") / "best.safetensors")["training"]["method"] == "mtkd"


def test_router_package_and_o_p_metrics(pipeline):
    results = pipeline.router()
    router = load_router(pipeline.root / "router.safetensors")
    assert router.thresholds == [0.05, 0.2] and [n for n, _ in router.teachers] == ["small", "medium", "large"]
    for name, package in [("original", router.original), *router.teachers]:
        step = pipeline.step_dir("original") if name == "original" else pipeline.step_dir("teacher", name)
        reference = load_package(step / "best.safetensors").model.state_dict()
        assert all(torch.equal(v, reference[k]) for k, v in package.model.state_dict().items())
    test = pipeline.splits["test"]
    assert results["test"]["images"] == len(test) and sum(results["test"]["routed"].values()) == len(test)
    # O-P by hand: M_O's predicted CAR picks the teacher (CAR <= threshold), whose prediction is scored.
    meter = []
    for item in test:
        pre, post, label = item.load()
        car = float((whole_image(predictor_for(router.original.model, router.original.manifest, "cpu"))(pre, post)
                     > 0.5).mean())
        teacher = router.teachers[0 if car <= 0.05 else 1 if car <= 0.2 else 2][1]
        prob = whole_image(predictor_for(teacher.model, teacher.manifest, "cpu"))(pre, post)
        meter.append(((prob > 0.5) & (label == 1)).sum())
    assert results["test"]["confusion"]["tp"] == sum(meter)


def test_run_skips_finished_steps(pipeline, monkeypatch):
    pipeline.distill()
    pipeline.router()

    def refuse(*args, **kwargs):
        raise AssertionError("a finished step was run again")

    monkeypatch.setattr(Trainer, "fit", refuse)
    monkeypatch.setattr(Pipeline, "partition", refuse)
    summary = pipeline.run()
    assert set(summary) == {"original", "student", "o-p"}
    assert all(s["global"]["mIoU"] >= 0 for s in summary.values())
    # A run killed after the router's package, before its test results: the router step is not finished, and runs
    # again (the rerun failed for want of the results, for good).
    (pipeline.root / "router_results.json").unlink()
    assert not pipeline.done("router")
    assert pipeline.run()["o-p"] == summary["o-p"]


def test_new_thresholds_redo_what_was_made_from_the_old_ones(pipeline, monkeypatch):
    """Run last: it re-thresholds the module's pipeline. M_O is kept; the partitions, teachers and router
    are made again (before, the old partitions were reused or the run failed with KeyError 'medium')."""
    original_results = (pipeline.step_dir("original") / "results.json").stat().st_mtime_ns
    again = Pipeline(derive(pipeline.cfg, {"mtkd": {"thresholds": [0.1]}}))
    assert again.done("original") and not again.done("partition") and not again.done("teachers")
    with pytest.raises(ConfigError, match="the teachers step is missing or was made from other inputs"):
        again.distill()
    again.teachers()
    parts = json.loads((again.root / "partitions.json").read_text())
    assert parts["thresholds"] == [0.1] and set(parts["train"]) == {"small", "large"}
    for name in ("small", "large"):
        manifest = read_manifest(again.step_dir("teacher", name) / "best.safetensors")
        assert manifest["training"]["data"]["train"] == len(parts["train"][name])
    again.router()
    router = load_router(again.root / "router.safetensors")
    assert router.thresholds == [0.1] and [n for n, _ in router.teachers] == ["small", "large"]
    assert (pipeline.step_dir("original") / "results.json").stat().st_mtime_ns == original_results
    # Unchanged inputs: nothing is done again.
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("a step made from the same inputs ran again"))
    assert Pipeline(again.cfg).done("teachers") and Pipeline(again.cfg).done("router")
    Pipeline(again.cfg).teachers()
    # Logging settings change how a run reports, not what it makes.
    assert Pipeline(derive(again.cfg, {"train": {"log_interval": 7}, "data": {"workers": 2}})).done("router")
    # A teacher made again (the same config, other weights) makes the router stale.
    teacher = again.step_dir("teacher", "small") / "best.safetensors"
    package = load_package(teacher)
    package.manifest["training"]["metrics"]["note"] = "trained again"
    save_package(package.model, package.manifest, teacher)
    assert Pipeline(again.cfg).done("teachers") and not Pipeline(again.cfg).done("router")
