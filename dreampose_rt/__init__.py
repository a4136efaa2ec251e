"""dreampose-rt: the optimized DreamPose inference runtime."""

__version__ = "0.1.0"
