import gzip
import json
from pathlib import Path

import yaml

from qat_tasks.cli import main
from qat_tasks.core.schema import SCHEMA_VERSION

ROOT = Path(__file__).resolve().parent.parent


def test_validate_config_reports_each_problem(tmp_path, capsys):
    bad = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    bad["calibration"]["sise"] = 3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert main(["validate-config", str(ROOT / "configs" / "demo.yaml"), str(ROOT / "configs" / "production.yaml")]) == 0
    assert main(["validate-config", str(path)]) == 1
    assert "calibration.sise: unknown key (did you mean 'sizes'?)" in capsys.readouterr().err


def test_generate_then_refresh(tmp_path, capsys, make_config, monkeypatch):
    out = tmp_path / "traffic"
    assert main(["generate-traffic", "--out", str(out), "--start", "2026-07-01", "--end", "2026-07-08",
                 "--per-day", "250", "--plain", "--seed", "4"]) == 0
    files = sorted(out.glob("dt=*/*.jsonl"))
    assert len(files) == 7
    first = json.loads(files[0].read_text().splitlines()[0])
    assert first["schema_version"] == SCHEMA_VERSION and first["event"] == "quantized_inference"
    cfg = make_config(traffic=str(out))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    capsys.readouterr()
    assert main(["--config", str(path), "refresh", "--reason", "cli test", "--start", "2026-07-01",
                 "--end", "2026-07-08"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["version"].startswith("20260701-20260708-")
    manifest = json.loads((Path(result["uri"]) / "manifest.json").read_text())
    assert manifest["input"]["lines"] > 1500
    assert gzip.decompress((Path(result["uri"]) / "qat_train.jsonl.gz").read_bytes())


def test_bad_window_is_a_clear_error(capsys, tiny_config_path):
    assert main(["--config", str(tiny_config_path), "refresh", "--reason", "x y z", "--start", "2026-07-10",
                 "--end", "2026-07-01"]) == 2
    assert "must be after" in capsys.readouterr().err
