# The pipeline image: Airflow 3.3.2 with the pinned stack and this project installed.
FROM apache/airflow:3.3.2-python3.11
USER airflow
WORKDIR /opt/airflow/project
COPY --chown=airflow:root requirements.txt constraints.txt pyproject.toml ./
# torch first and alone (CPU wheel index), so nothing later pulls a CUDA build; the GPU worker image
# overrides TORCH_INDEX_URL.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir "torch==2.13.0" --index-url "${TORCH_INDEX_URL}" \
 && pip install --no-cache-dir -r requirements.txt -c constraints.txt
COPY --chown=airflow:root qat_tasks ./qat_tasks
COPY --chown=airflow:root configs ./configs
COPY --chown=airflow:root dags /opt/airflow/dags
COPY --chown=airflow:root plugins /opt/airflow/plugins
RUN pip install --no-cache-dir --no-deps -e .
ENV QAT_CONFIG=/opt/airflow/project/configs/production.yaml HF_HUB_OFFLINE=0 MLFLOW_DISABLE_TELEMETRY=true
