"""MediaProxy: a media relay for SIP proxies (OpenSIPS, Kamailio)."""

__version__ = "3.0.0.dev0"
