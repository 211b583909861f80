"""Weight importance from gradients: the math of `gradsight importance` and `gradsight unlearn` (no I/O).

    stats       calibration sums of one captured pass (sum x^2, per-example gradient sums / squares, x x^T,
                gradient x activation per input unit)
    scores      magnitude, Wanda, GBLM-Pruner, Fisher-OBD, Taylor, SalUn saliency, neuron attribution, GAPrune DAI
    masks       unstructured per row / per layer / global (exact counts, stable ties), N:M, neuron masks
    sparsegpt   SparseGPT (OBS reconstruction with the layer Hessian) and a float64 reference
    sequential  block-by-block pruning of a decoder LM, each block calibrated on the pruned blocks' outputs
    evaluate    perplexity, finite checks, apply masks, save a pruned model (safetensors, verified reload)
    text        the shipped calibration / held-out text samples, token windows, text records
    embedding   GAPrune on sentence encoders (MiniLM): InfoNCE Fisher per domain, alignment, retrieval metrics
    unlearn     SalUn: saliency masks, masked random-label unlearning, UA / RA / TA / MIA on digits

Import the submodule you need (``from gradsight.importance.scores import gblm``); nothing is imported here.
"""
