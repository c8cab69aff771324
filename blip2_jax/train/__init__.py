"""Training: optimizer, train state, step functions and the loop."""
