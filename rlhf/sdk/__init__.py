"""What users touch: typed clients of the four services, the `rlhf` command line, the demo and its simulated rater."""
