# The Airflow image: scheduler, API server, dag-processor and (in local mode) the in-process worker.
FROM apache/airflow:3.3.2

COPY --chown=airflow:root requirements.txt constraints.txt /opt/vqa/
RUN pip install --no-cache-dir "apache-airflow==3.3.2" -r /opt/vqa/requirements.txt -c /opt/vqa/constraints.txt

COPY --chown=airflow:root dags/ /opt/airflow/dags/
COPY --chown=airflow:root plugins/ /opt/airflow/plugins/
COPY --chown=airflow:root include/ /opt/airflow/include/
ENV VQA_PROMPTS_DIR=/opt/airflow/include/prompts
