"""The seeds' API, for drop-in use of DataFlow's calls: ``FileStorage`` and the operator classes.

``operators``: ``ImageQAGenerate``, ``PersQAGenerate`` and the three ``MultiroleVideoQA*Generator``
stages, driving the same generators as the worker. ``file_storage``: the step files they read and
write. ``serving``: the serving classes the seeds pass in (``APIVLMServing_openai``, ``LocalModelVLMServing_vllm``),
the worker's own backends under the seeds' keyword names. They run in the user's own process on the
user's own files, so image paths are not confined unless a media root or allowed roots are given.
"""
