# The Airflow image: scheduler, API server, dag-processor, triggerer and (in local mode) the in-process worker.
# This package is installed (not copied into plugins/), with the pins of constraints.txt.
FROM apache/airflow:3.3.2

COPY --chown=airflow:root requirements.txt constraints.txt /opt/vqa/
COPY --chown=airflow:root pyproject.toml README.md /opt/vqa/src/
COPY --chown=airflow:root plugins/vqa_operators/ /opt/vqa/src/plugins/vqa_operators/
COPY --chown=airflow:root include/ /opt/vqa/src/include/
RUN pip install --no-cache-dir "apache-airflow==3.3.2" -r /opt/vqa/requirements.txt -c /opt/vqa/constraints.txt /opt/vqa/src

COPY --chown=airflow:root dags/ /opt/airflow/dags/
# kubernetes mode: loads the pod operator once per Airflow process (see the file)
COPY --chown=airflow:root plugins/airflow_local_settings.py /opt/airflow/plugins/
