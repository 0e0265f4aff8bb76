"""chimein: train and run a group-chat assistant that knows when to chime in."""

__version__ = "0.1.0"
