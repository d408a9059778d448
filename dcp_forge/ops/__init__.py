"""Operations on stored checkpoints, above storage: inspect, verify, diff, convert."""
