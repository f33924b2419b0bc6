"""The three encoders (intent classifier, escalation detector, reranker): building and fine-tuning the FP32 model,
exporting it to ONNX, what differs per role, finding or bootstrapping the @champion, measuring a model in ONNX
Runtime, and packaging it for the registry. `int8` holds their INT8 track."""
