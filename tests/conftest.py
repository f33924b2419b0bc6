"""Test isolation: Airflow, MLflow and the pipeline's state live in a temporary folder per session, and
the pipeline runs on a tiny config (tiny random-initialised encoder, small splits) over generated traffic.
Environment is set before anything imports Airflow or MLflow."""

from __future__ import annotations

import os
import tempfile
from datetime import date
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
_SESSION = Path(tempfile.mkdtemp(prefix="qat-tests-"))
WINDOW = (date(2026, 7, 1), date(2026, 7, 15))

os.environ.update({
    "AIRFLOW_HOME": str(_SESSION / "airflow"),
    "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
    "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__UNIT_TEST_MODE": "True",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_SESSION / 'airflow' / 'airflow.db'}",
    "MLFLOW_TRACKING_URI": f"sqlite:///{_SESSION / 'mlflow' / 'mlflow.db'}",
    "QAT_STATE_DIR": str(_SESSION / "state"),
    "QAT_CONFIG": str(_SESSION / "tiny.yaml"),
    "QAT_PUBLIC_CACHE": str(_SESSION / "public"),  # the vadersentiment sdist, fetched once per session
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "TOKENIZERS_PARALLELISM": "false",
})
(_SESSION / "airflow").mkdir(parents=True, exist_ok=True)
(_SESSION / "mlflow").mkdir(parents=True, exist_ok=True)


def pytest_sessionfinish(session, exitstatus):
    """The session's Airflow home, MLflow store, state and traffic go with it: runs on one machine (CI included)
    must not fill its disk."""
    import shutil

    shutil.rmtree(_SESSION, ignore_errors=True)


def tiny_config_dict(traffic: str) -> dict:
    """The demo config, shrunk: same keys, tiny model and splits."""
    data = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    data["profile"] = "test"
    data["traffic"]["source"] = traffic
    data["calibration"]["sizes"] = {"calibration": 64, "qat_train": 400, "selection": 150, "evaluation": 150}
    data["calibration"]["llm_conversations"] = 16
    data["calibration"]["min_per_intent"] = 3
    for model in data["models"][:3]:  # the encoders
        model["source"] = "tiny-random://bert"
        model["training"] = {"epochs": 1, "learning_rate": 1.0e-3, "batch_size": 64, "max_length": 32}
        model["quantization"] = {"candidates": ["ptq_dynamic", "ptq_static_minmax"], "parity_samples": 32,
                                 "calibration_batch_size": 16}
    data["models"][1]["data"]["max_rows"] = {"calibration": 120, "qat_train": 300, "selection": 150, "evaluation": 200}
    data["models"][2]["data"]["max_rows"] = {"calibration": 20, "qat_train": 60, "selection": 20, "evaluation": 20}
    llm = data["models"][3]
    assert llm["role"] == "llm"
    llm["source"] = "tiny-random://llama"
    llm["llm"] = {"candidates": [{"method": "rtn", "calibration": "none"}, {"method": "gptq", "calibration": "domain"},
                                 {"method": "awq", "calibration": "domain", "keep_blocks": [0, -1]}],
                  "group_size": 128, "awq_n_grid": 4, "calibration_samples": 8, "max_seq_len": 48, "chunk_layers": 2,
                  "eval_window": 32, "eval_generic_tokens": 256, "eval_domain_tokens": 256, "routing_rows": 20,
                  "sensitivity_tokens": 64, "max_new_tokens": 6}
    # A random-initialised LLM routes at chance; wide gates so the registration path is exercised (the gate
    # arithmetic itself is tested in test_gates.py).
    data.setdefault("gates", {})["llm"] = {"max_perplexity_increase_rel": 0.5, "max_routing_accuracy_drop_pts": 50.0}
    data["evaluation"] = {"threads": 1, "latency_samples": 20, "warmup": 2, "throughput_batch": 8, "ece_bins": 10}
    # The DAG tests deploy a passing challenger to @shadow and stop there (live review); whether the tiny INT8
    # model passes is noise. The replay review is tested on its own (test_shadow.py).
    data["shadow"] = {"review": "live"}
    return data


@pytest.fixture(scope="session")
def traffic_dir() -> Path:
    from qat_tasks.synthetic.generator import generate

    out = _SESSION / "traffic"
    generate(str(out), *WINDOW, records_per_day=250, seed=11, corrupt_rate=0.005)
    return out


@pytest.fixture(scope="session")
def tiny_config_path(traffic_dir) -> Path:
    path = Path(os.environ["QAT_CONFIG"])
    path.write_text(yaml.safe_dump(tiny_config_dict(str(traffic_dir))))
    return path


@pytest.fixture()
def tiny_config(tiny_config_path):
    from qat_tasks.core.config import load_config

    return load_config(tiny_config_path)


@pytest.fixture()
def make_config(traffic_dir, tmp_path):
    """A tiny config with overrides, its state in this test's own folder."""
    from qat_tasks.core.config import parse_config

    def make(traffic: str | None = None, **sections):
        data = tiny_config_dict(traffic or str(traffic_dir))
        data["state_dir"] = str(tmp_path / "state")
        for dotted, value in sections.items():
            node = data
            *parents, leaf = dotted.split("__")
            for p in parents:
                node = node[p]
            node[leaf] = value
        return parse_config(data, "test-config")

    os.environ.pop("QAT_STATE_DIR", None)
    yield make
    os.environ["QAT_STATE_DIR"] = str(_SESSION / "state")


@pytest.fixture(scope="session")
def airflow_db():
    from airflow.utils import db

    db.initdb()
    return True


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3-compatible server (moto's server mode) on loopback; real HTTP through boto3."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update({"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"})
    yield f"http://{host}:{port}"
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def intent_models(traffic_dir, tmp_path_factory) -> dict:
    """A tiny intent classifier fine-tuned for a few steps on the generated traffic: its Hugging Face folder,
    the FP32 ONNX graph and a dynamic-INT8 graph of it (built once per session; registries are per test)."""
    from transformers import set_seed

    from qat_tasks.core.config import parse_config
    from qat_tasks.core.config_sections import TrainingConfig
    from qat_tasks.core.schema import INTENTS, parse_line
    from qat_tasks.core.storage import open_lines
    from qat_tasks.encoders.int8 import ort_quant
    from qat_tasks.encoders.modeling import build_classifier, export_onnx
    from qat_tasks.encoders.training import train_classifier

    cfg = parse_config(tiny_config_dict(str(traffic_dir)), "test-config")
    rows = []
    for f in sorted(traffic_dir.glob("dt=*/*.jsonl.gz"))[:4]:
        for raw in open_lines(str(f)):
            rec, _ = parse_line(raw)
            if rec is not None:
                rows.append((rec.text, rec.reviewed_label or rec.intent))
    root = tmp_path_factory.mktemp("intent-models")
    set_seed(0)
    model, tokenizer = build_classifier(cfg, "tiny-random://bert", list(INTENTS))
    tc = TrainingConfig(epochs=1, learning_rate=1e-3, batch_size=64, max_length=32)
    train_classifier(model, tokenizer, [t for t, _ in rows], [INTENTS.index(y) for _, y in rows], len(INTENTS), tc,
                     progress=False)
    hf = root / "hf"
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    fp32 = export_onnx(model, tokenizer, root / "fp32" / "model.onnx", tc.max_length)
    pre = ort_quant.preprocess(fp32, root / "pre.onnx")
    (root / "int8").mkdir()
    int8 = ort_quant.quantize_dynamic(pre, root / "int8" / "model.onnx")
    return {"hf": hf, "fp32": fp32, "int8": int8, "labels": list(INTENTS), "max_length": tc.max_length}


FIXTURE_TEMPERATURE = 1.7


@pytest.fixture()
def intent_registry(intent_models, make_config, tmp_path) -> dict:
    """A fresh MLflow store (SQLite, this test's folder) holding intent-classifier v1 (FP32, @champion) and
    v2 (dynamic INT8, @challenger and @shadow), registered the way the pipeline registers them."""
    import mlflow

    from qat_tasks.core import registry, tracking
    from qat_tasks.encoders import packaging

    # mlflow.set_tracking_uri also sets $MLFLOW_TRACKING_URI: put the session's store back afterwards, or every
    # later test whose config leaves tracking.uri empty would use this test's registry.
    saved_uri = os.environ.get("MLFLOW_TRACKING_URI")
    cfg = make_config(tracking={"uri": f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}",
                                "experiment_prefix": "mangaassist"},
                      serving={"log_dir": str(tmp_path / "live-traffic"), "port": 0,
                               "reload_interval_s": 0.0, "log_flush_records": 50, "log_flush_seconds": 0.5})
    client = tracking.configure(cfg)
    exp = tracking.ensure_experiment(cfg, "intent-classifier")
    name = tracking.registered_name(cfg, "intent-classifier")
    versions = {}
    for precision, onnx in (("fp32", intent_models["fp32"]), ("int8", intent_models["int8"])):
        with mlflow.start_run(experiment_id=exp, run_name=f"fixture {precision}") as run:
            pkg = tmp_path / f"pkg-{precision}"
            import shutil

            shutil.copytree(intent_models["hf"], pkg / "hf")
            meta = {"labels": intent_models["labels"], "max_length": intent_models["max_length"],
                    "role": "intent_classifier", "pair": False, "precision": precision,
                    "calibration_version": "fixture", "source": "tiny-random://bert",
                    # The FP32 package carries a fitted temperature (as the pipeline's do); the INT8 one is an
                    # older package without one, which serves uncalibrated confidences.
                    **({"method": "ptq_dynamic"} if precision == "int8" else {"temperature": FIXTURE_TEMPERATURE})}
            uri = packaging.log_encoder(pkg / "hf", onnx, meta)
            versions[precision] = registry.register(
                client, name, uri, f"fixture:{precision}", run.info.run_id,
                {"calibration_version": "fixture", "method": precision,
                 **({"gates.offline": "passed"} if precision == "int8" else {})}, f"fixture {precision}")
    client.set_registered_model_alias(name, registry.CHAMPION, versions["fp32"])
    client.set_registered_model_alias(name, "challenger", versions["int8"])
    client.set_registered_model_alias(name, "shadow", versions["int8"])
    yield {"cfg": cfg, "client": client, "name": name, "champion": versions["fp32"], "shadow": versions["int8"],
           "log_dir": tmp_path / "live-traffic", "temperature": FIXTURE_TEMPERATURE}
    os.environ["MLFLOW_TRACKING_URI"] = saved_uri
    mlflow.set_tracking_uri(saved_uri)
    mlflow.set_registry_uri(saved_uri)


@pytest.fixture(scope="session")
def role_models(tmp_path_factory) -> dict:
    """A tiny random-initialised escalation detector and reranker (cross-encoder): for each, its Hugging Face
    folder, the FP32 ONNX graph and a dynamic-INT8 graph of it (built once per session). Untrained: they serve
    latency and plumbing, not quality."""
    from transformers import set_seed

    from qat_tasks.core.config import parse_config
    from qat_tasks.data.role_splits import ESCALATION_LABELS, RERANK_LABELS
    from qat_tasks.encoders.int8 import ort_quant
    from qat_tasks.encoders.modeling import build_classifier, export_onnx

    cfg = parse_config(tiny_config_dict(str(_SESSION / "traffic")), "test-config")
    out = {}
    for role, labels, pair in (("escalation_detector", list(ESCALATION_LABELS), False),
                               ("reranker", list(RERANK_LABELS), True)):
        root = tmp_path_factory.mktemp(role)
        set_seed(1)
        model, tokenizer = build_classifier(cfg, "tiny-random://bert", labels)
        hf = root / "hf"
        model.save_pretrained(hf)
        tokenizer.save_pretrained(hf)
        fp32 = export_onnx(model, tokenizer, root / "fp32" / "model.onnx", 32, pair=pair)
        (root / "int8").mkdir()
        int8 = ort_quant.quantize_dynamic(ort_quant.preprocess(fp32, root / "pre.onnx"), root / "int8" / "model.onnx")
        out[role] = {"hf": hf, "fp32": fp32, "int8": int8, "labels": labels, "max_length": 32, "pair": pair}
    return out


ROLE_MODEL_NAMES = {"escalation_detector": "escalation-detector", "reranker": "reranker"}
FIXTURE_THRESHOLD = 0.5


@pytest.fixture()
def encoder_registry(intent_registry, role_models, tmp_path) -> dict:
    """intent_registry's store with the escalation detector and the reranker beside the intent classifier: for
    each, v1 FP32 @champion and v2 dynamic INT8 @challenger and @shadow, registered the way the pipeline registers
    them (the escalation detector's packages carry their recall-tuned threshold)."""
    import shutil

    import mlflow

    from qat_tasks.core import registry, tracking
    from qat_tasks.encoders import packaging

    cfg, client = intent_registry["cfg"], intent_registry["client"]
    out = {"intent_classifier": {"name": intent_registry["name"], "champion": intent_registry["champion"],
                                 "shadow": intent_registry["shadow"]}}
    for role, models in role_models.items():
        model_name = ROLE_MODEL_NAMES[role]
        exp = tracking.ensure_experiment(cfg, model_name)
        name = tracking.registered_name(cfg, model_name)
        versions = {}
        for precision in ("fp32", "int8"):
            with mlflow.start_run(experiment_id=exp, run_name=f"fixture {precision}") as run:
                pkg = tmp_path / f"pkg-{role}-{precision}"
                shutil.copytree(models["hf"], pkg / "hf")
                meta = {"labels": models["labels"], "max_length": models["max_length"], "role": role,
                        "pair": models["pair"], "precision": precision, "calibration_version": "fixture",
                        "source": "tiny-random://bert",
                        **({"threshold": FIXTURE_THRESHOLD} if role == "escalation_detector" else {})}
                uri = packaging.log_encoder(pkg / "hf", models[precision], meta)
                versions[precision] = registry.register(
                    client, name, uri, f"fixture:{role}:{precision}", run.info.run_id,
                    {"calibration_version": "fixture", "method": precision,
                     **({"gates.offline": "passed"} if precision == "int8" else {})}, f"fixture {precision}")
        client.set_registered_model_alias(name, registry.CHAMPION, versions["fp32"])
        client.set_registered_model_alias(name, "challenger", versions["int8"])
        client.set_registered_model_alias(name, "shadow", versions["int8"])
        out[role] = {"name": name, "champion": versions["fp32"], "shadow": versions["int8"]}
    return {**intent_registry, "roles": out}
