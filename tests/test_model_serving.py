"""Registered versions serve on their own: the requirements MLflow logs with each encoder and LLM version are
pinned to constraints.txt and name only published packages, the stored pyfunc file imports nothing else, the
encoders carry a one-row input example, the pyfuncs answer what the gates measured, and `mlflow models serve
--env-manager virtualenv` builds an environment from a champion's own requirements and answers a request.

MLflow builds that environment with pyenv (for the Python the model was logged with) and `python -m venv` +
pip, which reads this machine's pip configuration; it caches it under ~/.mlflow/envs by the hash of the
requirements, so only the first run on a machine installs anything."""

from __future__ import annotations

import ast
import json
import os
import re
import sys
import time
import tomllib
import urllib.request
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from qat_tasks.core.pinned_requirements import CONSTRAINTS, canonical, constraint_pins, pinned

from .conftest import ROOT
from .stack import BIN, Server, free_port

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"]


def _download(uri: str, dest: Path) -> Path:
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(dest)))


def _assert_serves_on_its_own(model_dir: Path, expected: tuple[str, ...]) -> list[str]:
    """The logged environment: every requirement `name==version` at constraints.txt's version, none of them this
    project, exactly the packaging's list; the stored pyfunc file imports the standard library and those only."""
    pins = constraint_pins(CONSTRAINTS)
    reqs = (model_dir / "requirements.txt").read_text().split()
    names = []
    for req in reqs:
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][A-Za-z0-9.]*)", req)
        assert m, f"{req!r} is not pinned to one release"
        name = canonical(m.group(1))
        assert name != canonical(PROJECT), f"{req}: the project itself is on no package index"
        # constraints.txt is a freeze of what the pipeline installed from the index; a name outside it is not.
        assert pins.get(name) == m.group(2), f"{req}: constraints.txt pins {pins.get(name)}"
        names.append(name)
    assert sorted(names) == sorted(canonical(n) for n in expected)
    conda = yaml.safe_load((model_dir / "conda.yaml").read_text())
    assert next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict)) == reqs
    assert yaml.safe_load((model_dir / "python_env.yaml").read_text())["dependencies"] == ["-r requirements.txt"]
    flavor = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]
    assert not flavor.get("code") and not (model_dir / "code").exists()  # nothing beside the one file
    source = (model_dir / Path(flavor["model_code_path"]).name).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    providers = metadata.packages_distributions()
    for module in imported - set(sys.stdlib_module_names) - {"__future__"}:
        assert {canonical(d) for d in providers.get(module, [])} & set(names), \
            f"the stored pyfunc imports {module}, which no requirement provides"
    return reqs


@pytest.fixture()
def scratch_store(make_config, tmp_path):
    """An empty SQLite MLflow store in this test's folder, an active experiment in it; the session's store is put
    back afterwards (mlflow.set_tracking_uri also sets $MLFLOW_TRACKING_URI)."""
    import mlflow

    from qat_tasks.core import tracking

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    cfg = make_config(tracking={"uri": f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}",
                                "experiment_prefix": "serving"})
    tracking.configure(cfg)
    mlflow.set_experiment(experiment_id=tracking.ensure_experiment(cfg, "models"))
    yield cfg
    os.environ["MLFLOW_TRACKING_URI"] = saved
    mlflow.set_tracking_uri(saved)
    mlflow.set_registry_uri(saved)


def test_pins_come_from_constraints_else_from_the_installed_release(tmp_path):
    pins = constraint_pins(CONSTRAINTS)
    assert pinned("onnxruntime", "Compressed_Tensors") == [f"onnxruntime=={pins['onnxruntime']}",
                                                           f"Compressed_Tensors=={pins['compressed-tensors']}"]
    assert pinned("torch") == ["torch==2.13.0"]  # constraints.txt's 2.13.0+cpu: the public release
    # Installed from a wheel, without the source tree: what this environment runs, local label dropped.
    absent = tmp_path / "constraints.txt"
    assert pinned("onnxruntime", "torch", constraints=absent) == [
        f"onnxruntime=={metadata.version('onnxruntime')}", f"torch=={metadata.version('torch').split('+')[0]}"]
    for name in (PROJECT, "no-such-distribution"):
        with pytest.raises(KeyError, match=name):
            pinned(name)
    with pytest.raises(KeyError, match="no-such-distribution"):
        pinned("no-such-distribution", constraints=absent)


def test_registered_encoder_pins_its_runtime_and_carries_an_input_example(intent_registry, intent_models, tmp_path):
    import mlflow.pyfunc
    from transformers import AutoTokenizer

    from qat_tasks.core.metrics import softmax_t
    from qat_tasks.encoders import packaging
    from qat_tasks.encoders.modeling import OnnxClassifier

    uri = f"models:/{intent_registry['name']}@champion"
    model_dir = _download(uri, tmp_path / "champion")
    reqs = _assert_serves_on_its_own(model_dir, packaging.SERVING_REQUIREMENTS)
    print("requirements.txt:", " ".join(reqs))
    assert json.loads((model_dir / "serving_input_example.json").read_text()) == {
        "dataframe_split": {"columns": ["text"], "data": [["where is my order?"]]}}
    signature = mlflow.models.get_model_info(uri).signature
    assert signature.inputs.input_names() == ["text"] and signature.outputs.input_names() == ["intent", "confidence"]
    # The pyfunc answers what evaluation and the gates measured: OnnxClassifier's probabilities, temperature-scaled.
    texts = ["where is my order MA-2026-104233", "hi", "I want a refund for the damaged volume 4", "ok"]
    out = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"text": texts}))
    clf = OnnxClassifier(intent_models["fp32"], AutoTokenizer.from_pretrained(intent_models["hf"]),
                         intent_models["labels"], intent_models["max_length"])
    probs = softmax_t(np.log(np.clip(clf.predict_proba(texts), 1e-12, None)), intent_registry["temperature"])
    assert list(out["intent"]) == [intent_models["labels"][i] for i in probs.argmax(1)]
    np.testing.assert_allclose(out["confidence"], probs.max(1), rtol=1e-6)


def test_escalation_and_reranker_versions_answer_as_measured(encoder_registry, role_models, tmp_path):
    import mlflow
    from transformers import AutoTokenizer

    from qat_tasks.encoders import packaging
    from qat_tasks.encoders.modeling import OnnxClassifier

    from .conftest import FIXTURE_THRESHOLD

    queries = ["where is my order?", "this is the third time I ask, give me a person", "hi"]
    passages = ["Order status: tracking numbers are on the order page.", "Returns within 30 days.", "Hello!"]
    for role, models in role_models.items():
        uri = f"models:/{encoder_registry['roles'][role]['name']}@champion"
        model_dir = _download(uri, tmp_path / role)
        _assert_serves_on_its_own(model_dir, packaging.SERVING_REQUIREMENTS)
        example = json.loads((model_dir / "serving_input_example.json").read_text())["dataframe_split"]
        assert example["columns"] == list(packaging.EXAMPLES[role]) and len(example["data"]) == 1
        clf = OnnxClassifier(models["fp32"], AutoTokenizer.from_pretrained(models["hf"]), models["labels"],
                             models["max_length"])
        model = mlflow.pyfunc.load_model(uri)
        if role == "reranker":
            out = model.predict(pd.DataFrame({"text": queries, "text_pair": passages}))
            p = clf.predict_proba(list(zip(queries, passages, strict=True)))
            rel = models["labels"].index("relevant")
            np.testing.assert_allclose(out["score"], np.log(p[:, rel]) - np.log(p[:, 1 - rel]), rtol=1e-6, atol=1e-9)
        else:
            out = model.predict(pd.DataFrame({"text": queries}))
            p = clf.predict_proba(queries)[:, models["labels"].index("frustrated")]
            np.testing.assert_allclose(out["p_frustrated"], p, rtol=1e-6)
            assert list(out["escalate"]) == list(p >= FIXTURE_THRESHOLD)
            assert list(out["label"]) == ["frustrated" if e else "calm" for e in p >= FIXTURE_THRESHOLD]


@pytest.mark.slow
def test_llm_version_pins_its_runtime_and_generates_as_judged(scratch_store, tmp_path):
    pytest.importorskip("llmcompressor")
    import mlflow
    import torch

    from qat_tasks.llm import packaging
    from qat_tasks.llm.checkpoint import load_quantized
    from qat_tasks.llm.model import resolve_llm
    from qat_tasks.llm.quantize import QuantSpec, quantize
    from qat_tasks.llm.routing import greedy_generations

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster on a shared 2-core machine
    try:
        checkpoint = tmp_path / "package" / "checkpoint"
        quantize(resolve_llm(scratch_store, "tiny-random://llama"), QuantSpec("rtn", chunk_layers=2, max_seq_len=32),
                 [], checkpoint, work_dir=tmp_path / "work", progress=False)
        with mlflow.start_run():
            uri = packaging.log_llm(checkpoint, {"role": "llm", "method": "rtn", "max_new_tokens": 6})
        model_dir = _download(uri, tmp_path / "logged")
        reqs = _assert_serves_on_its_own(model_dir, packaging.SERVING_REQUIREMENTS)
        assert "torch==2.13.0" in reqs
        prompts = ["is volume 3 in stock?", "I want to talk to a person"]
        out = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"prompt": prompts}), params={"max_new_tokens": 5})
        model, tokenizer = load_quantized(checkpoint)
        assert list(out["completion"]) == greedy_generations(model, tokenizer, prompts, 5)
    finally:
        torch.set_num_threads(threads)


def _pyenv_path() -> str:
    """PATH with pyenv's folder: MLflow's virtualenv manager asks pyenv for the model's Python."""
    path = os.environ.get("PATH", "")
    pyenv_bin = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "bin"
    return f"{pyenv_bin}{os.pathsep}{path}" if (pyenv_bin / "pyenv").exists() else path


@pytest.mark.slow
@pytest.mark.stack
def test_registered_champion_serves_in_an_environment_built_from_its_requirements(intent_registry, tmp_path):
    """`mlflow models serve --env-manager virtualenv` on loopback: MLflow installs the version's pinned
    requirements (the first time on this machine; later runs reuse the environment it cached), starts its scoring
    server, and the answer is the in-process pyfunc's."""
    import mlflow.pyfunc

    uri = f"models:/{intent_registry['name']}@champion"
    port, log = free_port(), tmp_path / "model-server.log"
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "virtualenv",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {"MLFLOW_TRACKING_URI": intent_registry["cfg"].tracking.uri, "PATH": _pyenv_path()}
    t0 = time.monotonic()
    server = Server("model", cmd, f"http://127.0.0.1:{port}", "/ping", env, log, timeout=780)
    try:
        started = time.monotonic() - t0
        built = "Creating a new environment" in log.read_text(errors="replace")
        print(f"model server up in {started:.0f} s ({'environment built' if built else 'cached environment'})")
        request = {"dataframe_records": [{"text": "where is my order?"}]}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(request).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.loads(resp.read())
        print("POST /invocations", json.dumps(request))
        print("->", json.dumps(answer))
    finally:
        server.stop()
    (pred,) = answer["predictions"]
    labels = json.loads(_download(uri, tmp_path / "champion").joinpath("artifacts", "meta.json").read_text())["labels"]
    assert pred["intent"] in labels and 0.0 <= pred["confidence"] <= 1.0
    local = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"text": ["where is my order?"]}))
    assert pred["intent"] == local["intent"][0]
    assert pred["confidence"] == pytest.approx(local["confidence"][0], rel=1e-5)
