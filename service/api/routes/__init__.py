"""HTTP routers by concern: ``v1`` (images in, images out), ``v2`` (Open Inference Protocol), ``ops``."""
