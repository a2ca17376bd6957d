"""Model registry: inspect, store and version models."""
