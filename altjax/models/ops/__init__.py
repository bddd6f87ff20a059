"""Kernels with hand-written gradients: ``batch_norm`` (PyTorch-style BatchNorm, per-group
statistics) and ``depthwise_conv`` (depthwise convolution as shifted multiply-adds)."""
