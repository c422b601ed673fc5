"""TensorRT IPluginV3 plugins for the OmniMoE custom ops."""
