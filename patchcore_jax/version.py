"""The library version, recorded in every saved model."""
__version__ = '0.2.0'
