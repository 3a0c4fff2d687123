"""Node-to-node transport (gRPC with msgspec payloads) and peer discovery."""
