"""Batch jobs: ``stn batch INPUT OUTPUT`` rectifies many images offline (docs/BATCH.md).

The batch front end over the HTTP-free core (``service.settings``, ``service.runtime``, ``service.images``,
``service.pipeline``), in floors that import only downwards:

- ``inputs``: INPUT (folders, globs, manifests; local paths or fsspec URIs) -> items; reading an image.
- ``job``: OUTPUT and the job's state (:class:`~service.batch.job.Store`, atomic writes, the journal, resume,
  the reports).
- ``steps``: the per-image work both engines share (model loading, decode + prepare, finish, the record).
- ``local`` (threads) and ``ray_data`` (Ray Data; Ray imported on use): the engines.
- ``run``: :class:`~service.batch.run.BatchConfig`, :func:`~service.batch.run.run_job` (engine dispatch).
- ``cli``: ``stn batch`` and ``stn bench batch`` arguments; ``bench``: the benchmark.
"""
