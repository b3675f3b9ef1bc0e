"""Verifies a JWT-SVID with PyJWT, an independent JOSE implementation,
using only Herald's public OIDC discovery document and JWKS.

stdin: {"issuer", "token", "audience"}
stdout: {"ok": true, "claims": {...}, "header": {...}} or {"ok": false, "error": ...}
"""
import json
import sys
import urllib.request

import jwt


def main():
    req = json.load(sys.stdin)
    with urllib.request.urlopen(req["issuer"] + "/.well-known/openid-configuration", timeout=10) as r:
        discovery = json.load(r)
    if discovery["issuer"] != req["issuer"]:
        print(json.dumps({"ok": False, "error": "discovery issuer mismatch"}))
        return
    client = jwt.PyJWKClient(discovery["jwks_uri"], timeout=10)
    try:
        key = client.get_signing_key_from_jwt(req["token"])
        claims = jwt.decode(
            req["token"],
            key.key,
            algorithms=["ES256"],
            audience=req["audience"],
            issuer=req["issuer"],
            options={"require": ["exp", "iat", "sub", "aud", "jti"]},
        )
    except Exception as e:  # noqa: BLE001 - report any verification failure
        print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}))
        return
    print(json.dumps({"ok": True, "claims": claims, "header": jwt.get_unverified_header(req["token"])}))


main()
