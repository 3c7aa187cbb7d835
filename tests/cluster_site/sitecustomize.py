"""On ``PYTHONPATH`` of an ``airflow dags test`` run in kubernetes mode: its pods go to the container tier's namespace (``testkit.cluster``).

Python imports ``sitecustomize`` when it starts; ``VQA_TEST_CLUSTER`` names the namespace's config.
"""

import os

if os.environ.get("VQA_TEST_CLUSTER"):
    from testkit.cluster import install

    install(os.environ["VQA_TEST_CLUSTER"])
