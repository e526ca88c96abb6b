"""Pure tensor mathematics of information-theoretic diffusion: no I/O, no printing, no model code."""
