"""A model's lifecycle beside the request path: the gate a version passes (validation),
canary splits and their decisions, drift scoring, and the rollout state they persist."""
