"""edgeml cloud coordinator: telemetry ingestion, fleet and model registries, artifacts.

Installed with the ``cloud`` extra (``pip install 'edgeml[cloud]'``); the device agent
never imports it.
"""
