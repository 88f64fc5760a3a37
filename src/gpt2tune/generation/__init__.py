"""Generation: the sampler, its request checks, and the sample stage."""
