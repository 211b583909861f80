"""Inputs of an analysis: data records, models and their per-example losses."""
