"""Training of Stage 2 and Stage 3 on Lightning: data, the task base, the two tasks, fitting and registration."""
