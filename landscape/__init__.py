"""Loss landscapes: directions, 1D/2D surfaces, interpolation, trajectories, plots."""
