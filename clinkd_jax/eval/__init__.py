"""Med-GRIT-270k evaluation: metrics, reports, the evaluation run."""
