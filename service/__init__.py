"""Serving exported stn models: onnxruntime sessions, image I/O, the dynamic batcher, the HTTP app.

Nothing here imports torch. Light entry points: ``service.cli`` (``stn serve``),
``service.app.create_app``; the reusable, HTTP-free pieces are ``service.images``,
``service.runtime`` and ``service.pipeline``.
"""
