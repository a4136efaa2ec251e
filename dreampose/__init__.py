"""DreamPose in PyTorch: the model, the reference pipeline, pose and video I/O, and training."""

__version__ = "0.1.0"
