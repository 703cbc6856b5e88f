"""Training: step planning, the Accelerate loop, run directories."""
