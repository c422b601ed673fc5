"""ONNX export of models containing OmniMoE layers, and ONNX Runtime sessions for them."""
