"""Loading models saved by other projects onto diffscore's own modules, weight for weight."""
