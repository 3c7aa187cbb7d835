"""Airflow imports this module (``airflow_local_settings``) in every process it starts; ``plugins/`` is on its path.

In kubernetes mode it imports the KubernetesPodOperator here, once, so that the dag-processor's
parsing children (forked from a process that already holds it) do not import it again for every
parse of a DAG file: ~5 s a parse otherwise, measured by ``bench/parse_time.py``. Local mode
imports nothing. A deployment with its own ``airflow_local_settings.py`` should add these lines
to it.
"""

import logging

from vqa_operators.exceptions import ConfigError
from vqa_operators.settings import environment

_execution: str | None
try:
    _execution = environment().execution
except ConfigError as err:
    # every Airflow process imports this module: a bad VQA_* variable must not stop them all. The DAG
    # files read the same settings, so their import errors name the variable in the UI.
    logging.getLogger(__name__).warning("not preloading the pod operator: %s", err)
    _execution = None

if _execution == "kubernetes":
    import airflow.providers.cncf.kubernetes.operators.pod  # noqa: F401
