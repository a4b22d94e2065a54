"""From a checkpoint to a self-describing ONNX model.

``export.metadata`` and ``export.contract`` are torch-free (the service imports them);
``export.onnx_export`` and ``export.lowerings`` need torch.
"""
