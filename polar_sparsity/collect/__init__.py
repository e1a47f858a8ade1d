"""Activation capture hooks and the collect step."""
