"""The commands behind make targets (validate, manifests, smoke, canary gates, models);
importable so that tests can call them."""
