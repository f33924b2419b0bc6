"""The encoders' INT8 track: the ONNX Runtime quantization adapter, post-training quantization (dynamic, static,
SmoothQuant), quantization-aware training, per-layer sensitivity with FP32 fallback, and the track that measures
every candidate beside the champion and hands the results to the decision."""
