"""tellnorm: the l2 norm of hidden states as a signal for reasoning dynamics."""
__version__ = "0.1.0"
