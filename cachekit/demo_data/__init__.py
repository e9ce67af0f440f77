"""Embedded demo dataset: a small sample of public-domain OpenClipart images.

The images live in ``openclipart/<class_name>/`` next to this file (see
``README.md`` here and ``docs/demo-data.md``).  This module is intentionally
empty; it only makes the folder an importable package so the data ships with
cachekit.
"""
