"""Configs that rerun the paper's experiments (job 'sweep' and experiment runs)."""
