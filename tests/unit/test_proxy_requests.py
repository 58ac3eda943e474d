"""The proxy module's `update` and `remove` requests (SPEC §2) as typed values."""

import pytest

from mediaproxy.protocol.framing import Request
from mediaproxy.protocol.media import SignalingInfo
from mediaproxy.protocol.proxy import (RemoveRequest, RequestError, UpdateRequest, parse_proxy_request,
                                       parse_remove, parse_update)

INVITE = {
    "type": "request", "dialog_id": "3204:1183", "call_id": "a84b4c76e66710@pc33",
    "cseq": "314159 INVITE", "from_uri": "sip:alice@example.com", "to_uri": "sip:bob@example.com",
    "from_tag": "1928301774", "to_tag": "", "user_agent": "Phone/1.0",
    "signaling_ip": "192.0.2.10", "media_relay": "", "media": "audio:10.0.0.5:4000:sendrecv:ice=no",
}


def test_an_initial_invite():
    update = parse_update(INVITE)
    assert update == UpdateRequest(
        type="request", call_id="a84b4c76e66710@pc33", from_tag="1928301774", cseq=314159, to_tag=None,
        from_uri="sip:alice@example.com", to_uri="sip:bob@example.com", user_agent="Phone/1.0",
        dialog_id="3204:1183", media_relay=None, signaling=SignalingInfo("192.0.2.10"),
        media=parse_update(INVITE).media)
    assert update.is_request
    assert [(m.media_type, m.ip, m.port) for m in update.media] == [("audio", "10.0.0.5", 4000)]


def test_a_reply_without_sdp_has_no_media():
    update = parse_update(dict(INVITE, type="reply", to_tag="8321234356", media=""))
    assert not update.is_request
    assert update.media is None
    assert update.to_tag == "8321234356"


@pytest.mark.parametrize("name", ["to_tag", "dialog_id", "media_relay", "signaling_ip", "user_agent", "media"])
def test_empty_optional_headers_count_as_absent(name):
    with_empty = parse_update(dict(INVITE, **{name: ""}))
    without = parse_update({k: v for k, v in INVITE.items() if k != name})
    assert with_empty == without


def test_empty_tags_of_a_remove_count_as_absent():
    assert parse_remove({"call_id": "c1", "from_tag": "", "to_tag": ""}) == RemoveRequest("c1", None, None)


@pytest.mark.parametrize("name", ["call_id", "type", "cseq", "from_tag"])
@pytest.mark.parametrize("how", ["missing", "empty"])
def test_required_headers(name, how):
    headers = dict(INVITE)
    if how == "missing":
        del headers[name]
    else:
        headers[name] = ""
    with pytest.raises(RequestError, match=name):
        parse_update(headers)


@pytest.mark.parametrize("cseq", ["INVITE", "-1", "1.5", "0x10", "2147483648", "99999999999999999999"])
def test_a_bad_cseq_is_refused(cseq):
    with pytest.raises(RequestError, match="cseq"):
        parse_update(dict(INVITE, cseq=cseq))


def test_a_cseq_is_the_number_before_the_method():
    assert parse_update(dict(INVITE, cseq="2147483647 ACK")).cseq == 2147483647
    assert parse_update(dict(INVITE, cseq="0")).cseq == 0


def test_the_type_is_request_or_reply_in_any_case():
    assert parse_update(dict(INVITE, type="REPLY")).type == "reply"
    with pytest.raises(RequestError, match="type"):
        parse_update(dict(INVITE, type="response"))


@pytest.mark.parametrize("name, value", [
    ("media", "audio:10.0.0.5:70000:sendrecv"),
    ("media", "audio"),
    ("signaling_ip", "proxy.example.com"),
    ("media_relay", "relay.example.com"),
])
def test_bad_values_are_request_errors(name, value):
    with pytest.raises(RequestError):
        parse_update(dict(INVITE, **{name: value}))


def test_preferred_relay_and_the_json_signaling_ip():
    update = parse_update(dict(INVITE, media_relay="198.51.100.1",
                               signaling_ip='{"signaling_ip": "192.0.2.10", "username": "alice"}'))
    assert update.media_relay == "198.51.100.1"
    assert update.signaling == SignalingInfo("192.0.2.10", None, "alice")


@pytest.mark.parametrize("headers", [dict(INVITE, cseq="²"), dict(INVITE, media="audio:10.0.0.5:²:sendrecv")],
                         ids=["cseq", "media-port"])
def test_superscript_digits_are_request_errors(headers):
    with pytest.raises(RequestError):
        parse_update(headers)


def test_a_blank_cseq_is_a_request_error():
    with pytest.raises(RequestError):
        parse_update(dict(INVITE, cseq="  "))


# remove

def test_a_remove():
    assert parse_remove({"call_id": "c1", "from_tag": "f", "to_tag": "t"}) == RemoveRequest("c1", "f", "t")


def test_a_remove_with_empty_tags():
    assert parse_remove({"call_id": "c1", "from_tag": "", "to_tag": ""}) == RemoveRequest("c1", None, None)


@pytest.mark.parametrize("headers", [{}, {"call_id": ""}, {"from_tag": "f"}])
def test_a_remove_needs_a_call_id(headers):
    with pytest.raises(RequestError, match="call_id"):
        parse_remove(headers)


# dispatching on the command

def test_proxy_requests_by_command():
    assert isinstance(parse_proxy_request(Request("update", INVITE)), UpdateRequest)
    assert isinstance(parse_proxy_request(Request("Remove", {"call_id": "c"})), RemoveRequest)
    with pytest.raises(RequestError, match="unknown command"):
        parse_proxy_request(Request("delete", {"call_id": "c"}))


def test_request_errors_are_value_errors():
    assert issubclass(RequestError, ValueError)
