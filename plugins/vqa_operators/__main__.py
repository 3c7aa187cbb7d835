"""``python -m vqa_operators``: the worker CLI that pods and in-process tasks both run."""

import sys

from vqa_operators.worker.cli import main

if __name__ == "__main__":
    sys.exit(main())
