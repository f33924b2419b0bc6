"""What every stage shares: the typed configuration, the traffic record schema, run parameters and windows,
storage (local folders and s3://) with retries, MLflow tracking and the model registry, where model weights come
from, and the metrics and charts the stages log. It imports no other subpackage."""
