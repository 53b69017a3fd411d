"""The KRaft cluster id `finstream stack up` formats Kafka's storage with."""

from __future__ import annotations

import base64

from hypothesis import given
from hypothesis import strategies as st

from finstream.stack import kraft_cluster_id


def test_an_id_that_would_start_with_a_dash_is_drawn_again() -> None:
    # 0xfb... encodes to "-..." in URL-safe base64; the second draw does not.
    draws = iter([b"\xfb" + bytes(15), bytes(range(16))])
    cluster_id = kraft_cluster_id(lambda: next(draws))
    assert cluster_id == base64.urlsafe_b64encode(bytes(range(16))).rstrip(b"=").decode()


@given(st.binary(min_size=16, max_size=16))
def test_ids_are_22_url_safe_characters_that_never_start_with_a_dash(raw: bytes) -> None:
    cluster_id = kraft_cluster_id(iter([raw, bytes(range(16))]).__next__)
    assert len(cluster_id) == 22
    assert not cluster_id.startswith("-")
    assert set(cluster_id) <= set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    )
