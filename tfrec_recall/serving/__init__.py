"""Serving: gRPC and REST clients, and the local TF-Serving-compatible gRPC server."""
