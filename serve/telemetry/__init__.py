"""Metrics and statistics, defined once and handed to the parts that record them."""
