"""The node: owns engines and requests, fires callbacks, broadcasts status."""
