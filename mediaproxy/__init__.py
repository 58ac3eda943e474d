"""MediaProxy: a media relay for SIP proxies (OpenSIPS, Kamailio)."""

from mediaproxy.logs import use_quick_loggers

__version__ = "3.0.0.dev0"

use_quick_loggers()         # before any module makes its logger (mediaproxy/logs.py says why)
