# pip needs setup.py or pyproject.toml to build; all metadata lives in setup.cfg.
from setuptools import setup

setup()
