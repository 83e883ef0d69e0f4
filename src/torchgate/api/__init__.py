"""HTTP routes and the codecs that turn protocol messages into tensors and back."""
