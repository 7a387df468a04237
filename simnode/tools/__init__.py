"""Stand-ins for the node's client tools (kubectl, crictl): just enough for what the service and tests use."""
