"""Leaderboard records: export from results, the schema, and `lmms-quant validate`."""

import copy
import json

import pytest

from lmms_quant.analysis.leaderboard import SCHEMA, SCHEMA_VERSION, make_record, validate_record
from lmms_quant.analysis.results import load_runs
from lmms_quant.cli import main as cli
from tests.fixtures.results import SMALL

VALIDATORS = [pytest.param(True, id="jsonschema"), pytest.param(False, id="built-in")]


@pytest.fixture(scope="module")
def records():
    return {r.config_id: make_record(r) for r in load_runs(SMALL)}


@pytest.fixture(params=VALIDATORS)
def use_jsonschema(request):
    if request.param:
        pytest.importorskip("jsonschema")
    return request.param


def test_records_hold_what_a_leaderboard_needs(records, use_jsonschema):
    rec = records["toy__rtn__vit4_conn16_llm4"]
    assert rec["schema_version"] == SCHEMA_VERSION == "1.0"
    assert rec["bits"] == {"vit": 4, "connector": 16, "llm": 4}
    assert rec["methods"] == {"vit": "rtn", "connector": None, "llm": "rtn"}
    assert rec["bpw"]["study"] == pytest.approx(5.2) and rec["bpw"]["components"]["llm"]["study"] == 4
    assert rec["scores"] == {"lq_world_vqa": {"vqa_accuracy": 0.7}, "lq_world_caption": {"CIDEr": 1.14}}
    assert rec["versions"]["lmms-eval"] == "0.7.3" and rec["model"]["revision"] is None
    assert rec["source"]["config_id"] == "toy__rtn__vit4_conn16_llm4" and len(rec["weights_sha256"]) == 64
    for r in records.values():
        assert validate_record(r, use_jsonschema=use_jsonschema) == []


def broken(rec, path, value=..., delete=False):
    rec = copy.deepcopy(rec)
    *parents, last = path
    obj = rec
    for p in parents:
        obj = obj[p]
    if delete:
        del obj[last]
    else:
        obj[last] = value
    return rec


CASES = [
    (("schema_version",), "2.0", "$.schema_version"),
    (("bits", "llm"), 9, "$.bits.llm"),
    (("weights_sha256",), "abc", "$.weights_sha256"),
    (("bpw", "study"), -1, "$.bpw.study"),
    (("scores", "lq_world_vqa", "vqa_accuracy"), "0.7", "$.scores.lq_world_vqa.vqa_accuracy"),
    (("scores",), {}, "$.scores"),
    (("versions", "lmms-eval"), None, "$.versions.lmms-eval"),
    (("methods", "vit"), "magic", "$.methods.vit"),
    (("extra",), 1, "extra"),
]


@pytest.mark.parametrize("path, value, where", CASES)
def test_broken_records_are_rejected_with_a_message_naming_the_field(records, use_jsonschema, path, value, where):
    errors = validate_record(broken(records["toy__rtn__vit4_conn16_llm4"], path, value), use_jsonschema=use_jsonschema)
    assert errors and any(where in e for e in errors), errors


@pytest.mark.parametrize("key", ["model", "recipe", "bpw", "calibration", "versions", "weights_sha256", "source"])
def test_every_required_key_is_required(records, use_jsonschema, key):
    errors = validate_record(broken(records["toy__fp16"], (key,), delete=True), use_jsonschema=use_jsonschema)
    assert any(repr(key) in e and "required" in e for e in errors), errors


def test_checks_beyond_the_schema(records):
    rec = records["toy__rtn__vit4_conn16_llm4"]
    errors = validate_record(broken(rec, ("bits", "vit"), 8))
    assert errors == ["$.bits.vit: 8 but the recipe says 4"]
    errors = validate_record(broken(rec, ("recipe", "llm", "bits"), 11))
    assert len(errors) == 1 and errors[0].startswith("$.recipe: does not load as a recipe:") and "11" in errors[0]


def test_validate_command(tmp_path, records, capsys):
    for cid, rec in records.items():
        (tmp_path / f"{cid}.json").write_text(json.dumps(rec))
    assert cli(["validate", str(tmp_path)]) == 0
    assert "5 valid, 0 invalid" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text(json.dumps(broken(records["toy__fp16"], ("bits", "llm"), 1)))
    (tmp_path / "cut.json").write_text('{"schema_version": "1.0", ')
    (tmp_path / "many.jsonl").write_text(json.dumps(records["toy__fp16"]) + "\n" + json.dumps({"schema_version": "1.0"}) + "\n")
    assert cli(["validate", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "INVALID" in out and "bad.json" in out and "$.bits.llm" in out and "not valid JSON" in out
    assert "many.jsonl:2" in out and "6 valid, 3 invalid" in out
    assert cli(["validate", str(tmp_path / "nothing-here")]) == 1
    assert "no such file or folder" in capsys.readouterr().out
    assert cli(["validate", "--schema"]) == 0 and json.loads(capsys.readouterr().out) == SCHEMA
