"""Signs a request with botocore's own SigV4 signers (the AWS SDK for Python).

stdin: {"access_key_id", "secret_access_key", "session_token", "method", "url",
        "headers": {..}, "body", "region", "service", "s3": bool, "presign": seconds?}
stdout: {"method", "url", "headers": [[k, v], ...], "body"}
"""
import json
import sys

import botocore.auth
import botocore.awsrequest
import botocore.credentials


def main():
    req = json.load(sys.stdin)
    creds = botocore.credentials.Credentials(
        req["access_key_id"], req["secret_access_key"], req["session_token"]
    )
    r = botocore.awsrequest.AWSRequest(
        method=req["method"],
        url=req["url"],
        headers=req.get("headers", {}),
        data=req.get("body", "").encode(),
    )
    if req.get("presign"):
        cls = botocore.auth.S3SigV4QueryAuth if req.get("s3") else botocore.auth.SigV4QueryAuth
        cls(creds, req["service"], req["region"], expires=req["presign"]).add_auth(r)
    else:
        cls = botocore.auth.S3SigV4Auth if req.get("s3") else botocore.auth.SigV4Auth
        cls(creds, req["service"], req["region"]).add_auth(r)
    p = r.prepare()
    print(json.dumps({
        "method": p.method,
        "url": p.url,
        "headers": [[k, v] for k, v in p.headers.items()],
        "body": req.get("body", ""),
    }))


main()
