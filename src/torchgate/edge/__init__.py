"""The edge: pure ASGI layers every HTTP request passes, outermost first: the request
context (id, route match, access log), metrics, auth, rate limits, body limits, and the
dispatcher that calls the matched route's handler. Each reads the matched route's policy
(`api.routes`); none matches paths of its own."""
