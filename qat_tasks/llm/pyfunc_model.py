"""MLflow "model from code" for the 4-bit fallback LLM. The artifact `checkpoint` is a compressed-tensors
folder: production serves it with vLLM (`vllm serve <folder>`, docs/llm-4bit.md); this wrapper runs it on CPU with
transformers for review and smoke tests. Input: a DataFrame with a `prompt` column (one customer message per
row); output: the greedy `completion` of the chat-formatted prompt.

The file imports published packages only (pinned in the model's requirements), so `mlflow models serve` runs it
in an environment built from those requirements alone. It loads and generates as the 4-bit track judged the
checkpoint (`llm.checkpoint.load_quantized`, `llm.routing.greedy_generations`: packed int4 weights dequantized to
float32, greedy decoding one prompt at a time); the system prompt travels in the packaged meta."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class QuantizedLlmModel(PythonModel):
    def load_context(self, context):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils.quantization_config import CompressedTensorsConfig

        self.meta = json.loads(Path(context.artifacts["meta"]).read_text())
        path = context.artifacts["checkpoint"]
        with warnings.catch_warnings():  # "you passed quantization_config ...": only `dequantize` is taken, as meant
            warnings.filterwarnings("ignore", message=".*quantization_config.*", category=UserWarning)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                         quantization_config=CompressedTensorsConfig(dequantize=True))
        self.model, self.tokenizer = model.eval(), AutoTokenizer.from_pretrained(path)

    def _generate(self, prompt: str, max_new_tokens: int) -> str:
        tokenizer, system = self.tokenizer, self.meta.get("system_prompt", "")
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "system", "content": system},
                                                  {"role": "user", "content": prompt}],
                                                 tokenize=False, add_generation_prompt=True)
            enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        else:
            enc = tokenizer(f"{system}\nCustomer: {prompt}\nAssistant:", return_tensors="pt")
        device = next(self.model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        gen = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  temperature=None, top_p=None, top_k=None, pad_token_id=pad)
        return tokenizer.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        import torch

        max_new = int((params or {}).get("max_new_tokens", self.meta.get("max_new_tokens", 48)))
        with torch.inference_mode():
            return pd.DataFrame({"completion": [self._generate(p, max_new) for p in model_input["prompt"]]})


mlflow.models.set_model(QuantizedLlmModel())
