"""Built-in demo: arithmetic word problems answered fast, slow, or slow-but-wrong, and the demo pipeline."""
