"""Airflow imports this module (``airflow_local_settings``) in every process it starts; ``plugins/`` is on its path.

In kubernetes mode it imports the KubernetesPodOperator here, once, so that the dag-processor's
parsing children (forked from a process that already holds it) do not import it again for every
parse of a DAG file: ~5 s a parse otherwise, measured by ``bench/parse_time.py``. Local mode
imports nothing. A deployment with its own ``airflow_local_settings.py`` should add these lines
to it.
"""

from vqa_operators.settings import environment

if environment().execution == "kubernetes":
    import airflow.providers.cncf.kubernetes.operators.pod  # noqa: F401
