"""The HTTP front end: the FastAPI app (``app.create_app``), its dynamic batcher, admission,
routes (v1, the Open Inference Protocol v2, ops, the demo page), metrics and ``stn serve``.

Built on the HTTP-free core (``service.settings``, ``service.runtime``, ``service.images``,
``service.pipeline``); nothing in the core imports this package.
"""
