"""The media relay: sessions, ports and forwarding."""
