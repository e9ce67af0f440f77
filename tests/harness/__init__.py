"""Test harnesses that drive cachekit from outside (not part of the installed package)."""
