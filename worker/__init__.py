"""Kafka-to-Customer.io activation worker."""

__version__ = "0.1.0"
