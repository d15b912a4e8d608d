"""
Integrations with optional third-party packages.

Each submodule imports the package it integrates (``semantic.contrib.rest_framework``
needs djangorestframework); nothing elsewhere in ``semantic`` imports them, so
the app works without any of them installed.
"""
