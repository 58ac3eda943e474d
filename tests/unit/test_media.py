"""The proxy module's `media` and `signaling_ip` header values (SPEC §2)."""

import pytest

from mediaproxy.protocol.media import (MAX_STREAMS, MediaDescription, MediaError, SignalingInfo, parse_media,
                                       parse_signaling_ip, parse_stream)


def test_a_plain_stream():
    stream = parse_stream("audio:10.0.0.5:4000:sendrecv")
    assert stream == MediaDescription("audio", "10.0.0.5", 4000, "sendrecv", {})
    assert stream.address == ("10.0.0.5", 4000)
    assert not stream.on_hold and not stream.disabled and not stream.ice


def test_parameters_are_read_and_ice_is_known():
    stream = parse_stream("video:10.0.0.5:4002:sendonly:ice=yes:label=main")
    assert stream.parameters == {"ice": "yes", "label": "main"}
    assert stream.ice
    assert not parse_stream("audio:10.0.0.5:4000:sendrecv:ice=no").ice


def test_the_type_and_direction_are_case_insensitive():
    stream = parse_stream("AUDIO:10.0.0.5:4000:SendRecv:ICE=YES")
    assert (stream.media_type, stream.direction, stream.ice) == ("audio", "sendrecv", True)


@pytest.mark.parametrize("media_type", ["audio", "video", "image", "text", "application", "x-custom.1"])
def test_any_token_is_a_media_type(media_type):
    assert parse_stream("%s:10.0.0.5:4000:sendrecv" % media_type).media_type == media_type


@pytest.mark.parametrize("text, ip", [
    ("audio:2001:db8::1:4000:sendrecv", "2001:db8::1"),
    ("audio:2001:db8::1:4000:sendrecv:ice=yes", "2001:db8::1"),
    ("audio:2001:0db8:0:0:0:0:0:1:4000:recvonly", "2001:db8::1"),
    ("audio:2001:db8:::4000:sendrecv", "2001:db8::"),
    ("audio::::4000:sendrecv", "::"),
])
def test_ipv6_addresses(text, ip):
    stream = parse_stream(text)
    assert stream.ip == ip and stream.port == 4000


@pytest.mark.parametrize("text", [
    "audio:0.0.0.0:4000:sendrecv",     # RFC 2543 hold
    "audio::::4000:sendrecv",
    "audio:10.0.0.5:4000:sendonly",
    "audio:10.0.0.5:4000:inactive",
])
def test_hold(text):
    assert parse_stream(text).on_hold


def test_recvonly_is_not_hold():
    assert not parse_stream("audio:10.0.0.5:4000:recvonly").on_hold


def test_port_zero_is_a_disabled_stream():
    stream = parse_stream("video:10.0.0.5:0:sendrecv")
    assert stream.disabled and stream.port == 0


def test_the_highest_port_is_accepted():
    assert parse_stream("audio:10.0.0.5:65535:sendrecv").port == 65535


@pytest.mark.parametrize("text", [
    "audio:10.0.0.5:65536:sendrecv",
    "audio:10.0.0.5:-1:sendrecv",
    "audio:10.0.0.5::sendrecv",
    "audio:10.0.0.5:40 00:sendrecv",
    "audio:10.0.0.5:port:sendrecv",
    "audio:10.0.0.5:4000:sideways",
    "audio:10.0.0.5:4000",
    "audio:10.0.0.5",
    "audio",
    "",
    ":10.0.0.5:4000:sendrecv",
    "au dio:10.0.0.5:4000:sendrecv",
    "audio:10.0.0.256:4000:sendrecv",
    "audio:host.example.com:4000:sendrecv",
    "audio:10.0.0.5:4000:sendrecv:bad key=1",
    "audio:10.0.0.5:4000:sendrecv:=1",
])
def test_malformed_streams_are_media_errors(text):
    with pytest.raises(MediaError):
        parse_stream(text)


def test_media_errors_are_value_errors():
    assert issubclass(MediaError, ValueError)


def test_a_media_header_keeps_the_sdp_order():
    streams = parse_media("audio:10.0.0.5:4000:sendrecv:ice=no,video:10.0.0.5:4002:sendonly:ice=yes")
    assert [(s.media_type, s.port, s.direction, s.ice) for s in streams] == [
        ("audio", 4000, "sendrecv", False), ("video", 4002, "sendonly", True)]


def test_spaces_around_streams_are_ignored():
    streams = parse_media(" audio:10.0.0.5:4000:sendrecv , image:10.0.0.5:4004:sendrecv ")
    assert [s.media_type for s in streams] == ["audio", "image"]


def test_one_bad_stream_makes_the_header_bad():
    with pytest.raises(MediaError):
        parse_media("audio:10.0.0.5:4000:sendrecv,video:10.0.0.5:x:sendrecv")


def test_an_empty_stream_in_the_list_is_an_error():
    with pytest.raises(MediaError):
        parse_media("audio:10.0.0.5:4000:sendrecv,")


def test_the_number_of_streams_is_limited():
    parse_media(",".join(["audio:10.0.0.5:4000:sendrecv"] * MAX_STREAMS))
    with pytest.raises(MediaError, match="too many"):
        parse_media(",".join(["audio:10.0.0.5:4000:sendrecv"] * (MAX_STREAMS + 1)))


# signaling_ip, in its three forms

def test_signaling_ip_plain():
    assert parse_signaling_ip("192.0.2.10") == SignalingInfo("192.0.2.10", None, None)


def test_signaling_ip_with_destination():
    assert parse_signaling_ip("192.0.2.10_198.51.100.7") == SignalingInfo("192.0.2.10", "198.51.100.7", None)


def test_signaling_ip_ipv6():
    assert parse_signaling_ip("2001:db8::10").signaling_ip == "2001:db8::10"


def test_signaling_ip_json():
    info = parse_signaling_ip('{"signaling_ip": "192.0.2.10", "destination_ip": "198.51.100.7", '
                              '"username": "alice"}')
    assert info == SignalingInfo("192.0.2.10", "198.51.100.7", "alice")


def test_signaling_ip_json_with_only_the_signaling_ip():
    assert parse_signaling_ip('{"signaling_ip": "192.0.2.10", "destination_ip": "", "username": ""}') == \
        SignalingInfo("192.0.2.10", None, None)


@pytest.mark.parametrize("value", [
    "", "not-an-ip", "192.0.2.10_nope", "{", '{"destination_ip": "192.0.2.1"}',
    '["192.0.2.10"]', '{"signaling_ip": 17}', '{"signaling_ip": "192.0.2.10", "destination_ip": "x"}',
])
def test_bad_signaling_ip_values_are_media_errors(value):
    with pytest.raises(MediaError):
        parse_signaling_ip(value)
