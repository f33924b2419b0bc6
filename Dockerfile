# The pipeline image: Airflow 3.3.2 with the pinned runtime stack and this project installed.
# The slim base holds Airflow core and its preinstalled providers only: the full image's extra providers
# (Amazon, Google, FAB, ...) pin their own ranges of boto3, SQLAlchemy and pandas, which this stack's pins move
# past, and `pip check` below would fail on them.
FROM apache/airflow:slim-3.3.2-python3.11
# The pipeline's state folder (state_dir in configs/production.yaml, volume qat-state) and the auth manager's
# password folder (volume airflow-auth), owned by the Airflow user: a fresh named volume takes the ownership
# of the folder it is mounted on, so the tasks (uid 50000) can write to it. airflow-init chowns volumes
# created before.
USER root
RUN install -d -o airflow -g root -m 0775 /var/lib/qat-pipeline \
 && install -d -o airflow -g root -m 0700 /opt/airflow/auth
USER airflow
WORKDIR /opt/airflow/project
# Runtime pins only: the test tools are in requirements-dev.txt, which the image does not install.
COPY --chown=airflow:root requirements.txt constraints.txt pyproject.toml ./
# torch first and alone (CPU wheel index), so nothing later pulls a CUDA build; the GPU worker image
# overrides TORCH_INDEX_URL. constraints.txt is the CPU freeze (torch==2.13.0+cpu): the second install is
# held at the public version, 2.13.0, which the CPU and the CUDA wheels both satisfy, and everything else
# at its frozen version. `pip check` then fails the build on any broken requirement.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir "torch==2.13.0" --index-url "${TORCH_INDEX_URL}" \
 && sed 's/^torch==.*/torch==2.13.0/' constraints.txt > /tmp/constraints.txt \
 && pip install --no-cache-dir -r requirements.txt -c /tmp/constraints.txt \
 && rm /tmp/constraints.txt
COPY --chown=airflow:root qat_tasks ./qat_tasks
COPY --chown=airflow:root configs ./configs
COPY --chown=airflow:root dags /opt/airflow/dags
COPY --chown=airflow:root plugins /opt/airflow/plugins
RUN pip install --no-cache-dir --no-deps -e . \
 && pip check
ENV QAT_CONFIG=/opt/airflow/project/configs/production.yaml HF_HUB_OFFLINE=0 MLFLOW_DISABLE_TELEMETRY=true
