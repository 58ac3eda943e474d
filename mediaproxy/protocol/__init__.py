"""Wire codecs of the control protocols. Pure: bytes and values in, values out."""
