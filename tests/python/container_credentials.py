"""Reads credentials the way an AWS SDK in a container or function does:
botocore's container credential provider (AWS_CONTAINER_CREDENTIALS_FULL_URI
+ AWS_CONTAINER_AUTHORIZATION_TOKEN), nothing Herald-specific."""
import json

import boto3

session = boto3.Session(region_name="us-east-1")
creds = session.get_credentials()
frozen = creds.get_frozen_credentials()
print(json.dumps({
    "method": creds.method,
    "access_key": frozen.access_key,
    "has_secret": bool(frozen.secret_key),
    "token_len": len(frozen.token or ""),
}))
