"""AssumeRoleWithWebIdentity against Herald with boto3, unchanged.

stdin: {"endpoint", "role_arn", "session_name", "token", "duration"?, "policy"?,
        "sign": {"method", "url", "body", "region", "service"}?}
stdout: {"ok": true, "credentials": {...}, "assumed_role_user": {...},
         "subject": ..., "provider": ..., "audience": ...,
         "signed": {"method", "url", "headers": [[k, v], ...], "body"}?}
     or {"ok": false, "code": <AWS error code>, "message": ..., "status": <HTTP status>}
"""
import json
import sys

import boto3
import botocore.auth
import botocore.awsrequest
import botocore.credentials
from botocore.config import Config
from botocore.exceptions import ClientError


def main():
    req = json.load(sys.stdin)
    sts = boto3.client(
        "sts",
        region_name="us-east-1",
        endpoint_url=req["endpoint"],
        # Unsigned call, as the SDKs' web-identity provider makes it.
        config=Config(retries={"max_attempts": 1}),
        # Herald's HTTPS listener presents a certificate from its own CA.
        verify=req.get("verify", True),
        aws_access_key_id="unused",
        aws_secret_access_key="unused",
    )
    kwargs = dict(
        RoleArn=req["role_arn"],
        RoleSessionName=req["session_name"],
        WebIdentityToken=req["token"],
    )
    if "duration" in req:
        kwargs["DurationSeconds"] = req["duration"]
    if "policy" in req:
        kwargs["Policy"] = req["policy"]
    try:
        resp = sts.assume_role_with_web_identity(**kwargs)
    except ClientError as e:
        err = e.response.get("Error", {})
        print(json.dumps({
            "ok": False,
            "code": err.get("Code"),
            "message": err.get("Message"),
            "status": e.response.get("ResponseMetadata", {}).get("HTTPStatusCode"),
        }))
        return
    creds = resp["Credentials"]
    out = {
        "ok": True,
        "credentials": {
            "AccessKeyId": creds["AccessKeyId"],
            "SecretAccessKey": creds["SecretAccessKey"],
            "SessionToken": creds["SessionToken"],
            "Expiration": creds["Expiration"].isoformat(),
        },
        "assumed_role_user": resp.get("AssumedRoleUser"),
        "subject": resp.get("SubjectFromWebIdentityToken"),
        "provider": resp.get("Provider"),
        "audience": resp.get("Audience"),
        "request_id": resp.get("ResponseMetadata", {}).get("RequestId"),
    }
    sign = req.get("sign")
    if sign:
        # Sign a downstream request with the issued credentials using the
        # SDK's own SigV4 signer.
        c = botocore.credentials.Credentials(
            creds["AccessKeyId"], creds["SecretAccessKey"], creds["SessionToken"]
        )
        r = botocore.awsrequest.AWSRequest(
            method=sign["method"], url=sign["url"], data=sign.get("body", "").encode()
        )
        # S3 signs the path as sent (and the payload hash header); every
        # other service uses the generic signer.
        signer = botocore.auth.S3SigV4Auth if sign["service"] == "s3" else botocore.auth.SigV4Auth
        signer(c, sign["service"], sign["region"]).add_auth(r)
        p = r.prepare()
        out["signed"] = {
            "method": p.method,
            "url": p.url,
            "headers": [[k, v] for k, v in p.headers.items()],
            "body": sign.get("body", ""),
        }
    print(json.dumps(out))


main()
