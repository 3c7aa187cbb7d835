"""On ``PYTHONPATH`` of an ``airflow dags test`` run in kubernetes mode: its pods go to a local kubelet stand-in (``testkit.kubelet``).

Python imports ``sitecustomize`` when it starts; ``VQA_TEST_KUBELET`` names the stand-in's config.
"""

import os

if os.environ.get("VQA_TEST_KUBELET"):
    from testkit.kubelet import install_in_pod_operator

    install_in_pod_operator(os.environ["VQA_TEST_KUBELET"])
