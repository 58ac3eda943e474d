"""The media dispatcher: the proxy's side of MediaProxy."""
