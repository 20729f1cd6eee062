"""RunConfig: the teacher is one section, and config.json files written before that (the
teacher in "aldk" and/or "crd") still load."""

import json

import pytest

from aldk_tf.config import RunConfig, TeacherConfig
from aldk_tf.training import runs

MODEL = {"image_size": [16, 16, 16]}


def old_style(aldk_teacher=None, crd_teacher=None, aldk=None, crd=None):
    """A config.json dict as written before the teacher section: both sections hold it."""
    return {"model": MODEL,
            "aldk": {**(aldk or {}), "teacher": aldk_teacher,
                     "teacher_rep": 3 if aldk_teacher else 0},
            "crd": {**(crd or {}), "teacher": crd_teacher,
                    "teacher_rep": 2 if crd_teacher else 0}}


@pytest.mark.parametrize("data, expected", [
    (old_style("w/t", aldk={"enabled": True}), TeacherConfig("w/t", 3)),
    (old_style("w/t", aldk={"flow_weight": 1.0}), TeacherConfig("w/t", 3)),
    (old_style(crd_teacher="w/t", crd={"enabled": True}), TeacherConfig("w/t", 2)),
    # Both named (the CLI wrote the same into both): the one training used wins.
    (old_style("w/a", "w/c", aldk={"enabled": True}, crd={"enabled": True}),
     TeacherConfig("w/a", 3)),
    (old_style("w/a", "w/c", crd={"enabled": True}), TeacherConfig("w/c", 2)),
    (old_style(), TeacherConfig(None, 0))])
def test_an_old_config_keeps_its_teacher(tmp_path, data, expected):
    (tmp_path / "config.json").write_text(json.dumps(data))
    config = RunConfig.load(str(tmp_path))
    assert config.teacher == expected
    assert config.aldk.enabled == data["aldk"].get("enabled", False)
    saved = config.to_dict()
    assert saved["teacher"] == {"run": expected.run, "rep": expected.rep}
    assert "teacher" not in saved["aldk"] and "teacher_rep" not in saved["crd"]
    # Resuming such a run with the same settings is no change of settings.
    assert runs.setting_changes(config, RunConfig.from_dict(saved)) == {}


def test_the_teacher_section_round_trips_and_is_type_checked():
    config = RunConfig.from_dict({"model": MODEL, "teacher": {"run": "w/t", "rep": 2}})
    assert config.teacher == TeacherConfig("w/t", 2)
    assert RunConfig.from_dict(config.to_dict()) == config
    with pytest.raises(TypeError, match="'teacher.rep' is 'x'"):
        RunConfig.from_dict({"model": MODEL, "teacher": {"rep": "x"}})
    with pytest.raises(TypeError, match="'teacher.run' is 5"):
        RunConfig.from_dict({"model": MODEL, "aldk": {"teacher": 5}})


def test_every_distillation_term_needs_the_one_teacher():
    for section, setting in (("aldk", {"enabled": True}), ("aldk", {"flow_weight": 0.5}),
                             ("crd", {"enabled": True})):
        config = RunConfig.from_dict({"model": MODEL, section: setting})
        with pytest.raises(ValueError, match="needs --teacher"):
            config.check_teacher()
        config.teacher.run = "w/t"
        config.check_teacher()
