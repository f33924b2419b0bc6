from pathlib import Path

import pytest
import yaml

from qat_tasks.core.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent


def demo() -> dict:
    return yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())


def test_shipped_profiles_parse():
    assert load_config(ROOT / "configs" / "demo.yaml").profile == "demo"
    prod = load_config(ROOT / "configs" / "production.yaml")
    # The production profile carries the full-size calibration splits.
    assert (prod.calibration.sizes.evaluation, prod.calibration.sizes.qat_train) == (5500, 44000)
    assert prod.calibration.llm_conversations == 128
    assert prod.traffic.source.startswith("s3://") and prod.calibration_store.startswith("s3://")
    assert {m.role for m in prod.models} == {"intent_classifier", "escalation_detector", "reranker", "llm"}


def test_typo_in_a_key_is_named_with_file_and_suggestion():
    data = demo()
    data["calibration"]["sizes"]["qat_trian"] = data["calibration"]["sizes"].pop("qat_train")
    with pytest.raises(ConfigError) as err:
        parse_config(data, "configs/demo.yaml")
    msg = str(err.value)
    assert "configs/demo.yaml" in msg
    assert "calibration.sizes.qat_trian: unknown key (did you mean 'qat_train'?)" in msg
    assert "calibration.sizes.qat_train" in msg and "missing" in msg.lower()


def test_typo_at_the_top_level_and_in_a_model():
    data = demo()
    data["traffik"] = data.pop("traffic")
    data["models"][0]["runtme"] = "onnxruntime"
    msg = str(pytest.raises(ConfigError, parse_config, data, "x.yaml").value)
    assert "traffik: unknown key (did you mean 'traffic'?)" in msg
    assert "models.0.runtme: unknown key (did you mean 'runtime'?)" in msg


@pytest.mark.parametrize("path,value,expect", [
    (("calibration", "min_per_intent"), "20", "calibration.min_per_intent"),
    (("traffic", "max_invalid_fraction"), 1.5, "traffic.max_invalid_fraction"),
    (("calibration", "rare_intents"), ["escalation", "weather"], "unknown intent"),
    (("calibration", "on_missing_intent"), "ignore", "calibration.on_missing_intent"),
    (("calibration", "split_fractions"), {"calibration": 0.5, "qat_train": 0.5, "evaluation": 0.5}, "sum to 1"),
    (("traffic", "window"), {"start": "2026-07-01", "end": "2026-06-01"}, "must be after"),
])
def test_wrong_types_and_values_are_rejected(path, value, expect):
    data = demo()
    data[path[0]][path[1]] = value
    with pytest.raises(ConfigError, match=expect):
        parse_config(data, "demo.yaml")


def test_model_fields_are_checked():
    data = demo()
    data["models"][0]["method"] = "int3"
    assert "models.0.method" in str(pytest.raises(ConfigError, parse_config, data, "demo.yaml").value)
    data = demo()
    data["models"].append(dict(data["models"][1]))
    assert "duplicate model names" in str(pytest.raises(ConfigError, parse_config, data, "demo.yaml").value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("profile: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_tracking_uri_defaults_to_embedded_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("QAT_STATE_DIR", raising=False)
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert cfg.tracking_uri == f"sqlite:///{ROOT / '.state' / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert cfg.tracking_uri == "http://mlflow:5000"


def test_llm_track_settings_are_checked_with_the_key_named():
    data = demo()
    llm = next(m for m in data["models"] if m["role"] == "llm")
    llm["llm"]["candidates"].append({"method": "rtn", "calibration": "domain"})
    msg = str(pytest.raises(ConfigError, parse_config, data, "demo.yaml").value)
    assert "models.3.llm.candidates" in msg and "takes no calibration data" in msg

    data = demo()
    next(m for m in data["models"] if m["role"] == "llm")["llm"]["group_sise"] = 64
    assert "group_sise: unknown key (did you mean 'group_size'?)" in str(
        pytest.raises(ConfigError, parse_config, data, "demo.yaml").value)

    data = demo()
    data["models"][0]["llm"] = {"group_size": 64}
    assert "apply to role 'llm'" in str(pytest.raises(ConfigError, parse_config, data, "demo.yaml").value)

    data = demo()
    llm = next(m for m in data["models"] if m["role"] == "llm")
    llm["llm"]["candidates"] = [{"method": "awq"}, {"method": "awq", "calibration": "domain"}]
    assert "duplicate candidates ['awq-domain']" in str(pytest.raises(ConfigError, parse_config, data, "demo.yaml").value)


def test_production_sends_llm_work_to_the_gpu_queue_and_a_one_slot_pool():
    prod = load_config(ROOT / "configs" / "production.yaml")
    assert (prod.scheduling.llm_queue, prod.scheduling.llm_pool) == ("gpu", "llm_gpu")
    demo_cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert (demo_cfg.scheduling.llm_queue, demo_cfg.scheduling.llm_pool) == ("default", "default_pool")
    keys = [c.key for c in demo_cfg.model("fallback-llm").llm_track.candidates]
    # mixed precision by measurement within the memory gate (the RTN baseline is in the benchmark)
    assert ["gptq-both-spinquant-imatrix-asym-g64-mixed5.5"] == keys
    assert demo_cfg.gates.llm.max_average_bits == 5.5
    full = load_config(ROOT / "configs" / "full.yaml")
    keys = [c.key for c in full.model("fallback-llm").llm_track.candidates]
    assert {"rtn", "awq-domain", "gptq-domain-asym-g64", "gptq-generic-asym-g64",
            "gptq-both-spinquant-imatrix-asym-g64", "gptq-both-spinquant-imatrix-asym-g64-mixed5.5"} == set(keys)
    assert all(m.quantization.candidate_set == "all" for m in full.models if m.role != "llm")
