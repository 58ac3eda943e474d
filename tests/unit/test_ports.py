"""The relay's pool of even/odd port pairs."""

import pytest

from mediaproxy.relay.ports import PortPool, PortsExhausted


@pytest.mark.parametrize("start, end", [(40001, 40010), (40000, 40011), (40010, 40000), (40000, 40000),
                                        (0, 10), (65534, 65538)])
def test_the_range_needs_even_bounds_in_order(start, end):
    with pytest.raises(ValueError):
        PortPool(start, end)


def test_ports_are_the_even_ports_of_the_range_in_order():
    pool = PortPool(40000, 40008)
    assert pool.capacity == 4
    assert [pool.allocate() for _ in range(4)] == [40000, 40002, 40004, 40006]
    assert pool.used_count == 4 and pool.free_count == 0


def test_the_end_bound_is_excluded_and_65534_is_usable():
    pool = PortPool(65532, 65536)
    assert [pool.allocate(), pool.allocate()] == [65532, 65534]


def test_exhaustion_raises_ports_exhausted_and_says_so():
    pool = PortPool(40000, 40004)
    pool.allocate(), pool.allocate()
    with pytest.raises(PortsExhausted, match="40000:40004"):
        pool.allocate()
    assert pool.used_count == 2


def test_a_freed_port_is_reused_last():
    pool = PortPool(40000, 40008)
    first = pool.allocate()
    pool.release(first)
    assert [pool.allocate() for _ in range(4)] == [40002, 40004, 40006, 40000]


def test_release_makes_room_again():
    pool = PortPool(40000, 40004)
    a, b = pool.allocate(), pool.allocate()
    pool.release(b)
    assert pool.allocate() == b
    assert pool.used_count == 2


def test_releasing_an_unknown_or_free_port_changes_nothing():
    pool = PortPool(40000, 40004)
    port = pool.allocate()
    pool.release(port)
    pool.release(port)
    pool.release(12345)
    assert pool.free_count == 2 and pool.used_count == 0
    assert [pool.allocate(), pool.allocate()] == [40002, 40000]
    with pytest.raises(PortsExhausted):
        pool.allocate()


def test_a_set_aside_port_is_never_handed_out_again():
    pool = PortPool(40000, 40006)
    port = pool.allocate()
    pool.set_aside(port)
    pool.release(port)
    assert pool.used_count == 0
    assert pool.set_aside_ports == {40000}
    assert [pool.allocate(), pool.allocate()] == [40002, 40004]
    with pytest.raises(PortsExhausted):
        pool.allocate()


def test_upcoming_names_what_the_next_allocations_hand_out():
    pool = PortPool(40000, 40008)
    pool.release(pool.allocate())
    assert pool.upcoming(3) == [40002, 40004, 40006]
    assert pool.upcoming(9) == [40002, 40004, 40006, 40000]
    assert [pool.allocate() for _ in range(3)] == [40002, 40004, 40006]
