"""Pure ASGI middleware, outermost first: request context, metrics, auth, limits."""
