"""Many runs at once: parallel per-task training, ablation sweeps, their plots and parameter counts."""
