"""medrl: RL for medical assistants."""
__version__ = "0.1.0"
