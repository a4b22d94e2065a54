"""Running exported stn models: the HTTP-free core and its two front ends.

The core (this package's modules: ``settings``, ``runtime``, ``images``, ``pipeline``, and
``doctor``) never imports a front end. Front ends: ``service.api`` (the FastAPI app, ``stn
serve``) and the batch engines (``stn batch``). Nothing here imports torch.
"""
