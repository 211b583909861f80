"""Inputs of an analysis: the two input adapters (`lm`: a Hugging Face language model and records; `module`: a
plain nn.Module, its batches and a loss), the per-example loop shared by per-example analyses (`examples`),
and data records, models and per-example losses (`data`, `models`, `losses`)."""
