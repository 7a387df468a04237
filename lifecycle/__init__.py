"""lifecycle: brings a single-node Kubernetes cluster up through explicit states, driven over MQTT."""

__version__ = "0.1.0"
