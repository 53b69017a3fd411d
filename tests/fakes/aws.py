"""What AWS fakes share: checking a request's SigV4 signature the way AWS does.

The Authorization header's credential (key id, date, region, service) is
checked against the fake's, then the signature is recomputed over the signed
headers with botocore's canonical request, so a client that signs wrongly
(or with another secret) is refused as AWS would refuse it.
"""

from __future__ import annotations

import hmac
import re

from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

_AUTH = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/(?P<service>[^/]+)/aws4_request, "
    r"SignedHeaders=(?P<signed>[^,]+), Signature=(?P<sig>[0-9a-f]{64})$"
)


def sigv4_problem(
    request: web.Request,
    body: bytes,
    *,
    access_key: str,
    secret_key: str,
    region: str,
    service: str,
) -> str | None:
    """None when the request is signed by these credentials for this region and service;
    else what is wrong (``UnrecognizedClientException`` for an unknown key id)."""
    match = _AUTH.match(request.headers.get("Authorization", ""))
    if not match:
        return "missing or malformed Authorization"
    if match["key"] != access_key:
        return "UnrecognizedClientException"
    if match["region"] != region or match["service"] != service:
        return "credential scope"
    amz_date = request.headers.get("X-Amz-Date", "")
    if not amz_date.startswith(match["date"]):
        return "date mismatch"
    signed = match["signed"].split(";")
    headers = {name: request.headers.get(name, "") for name in signed}
    aws = AWSRequest(method=request.method, url=str(request.url), data=body, headers=headers)
    aws.context["timestamp"] = amz_date
    signer = SigV4Auth(Credentials(access_key, secret_key), service, region)
    canonical = signer.canonical_request(aws)
    expected = signer.signature(signer.string_to_sign(aws, canonical), aws)
    return None if hmac.compare_digest(expected, match["sig"]) else "SignatureDoesNotMatch"
