"""Pure torch math: schedules, preconditioning, losses, samplers, analytic denoisers. No Lightning, no I/O."""
