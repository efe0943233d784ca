"""Scoring trained models: perplexity and generation-based evaluation, batched generation, metrics, heatmaps."""
