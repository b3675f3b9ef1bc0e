"""The AWS SDK's own web-identity credential provider, pointed at Herald.

The environment carries AWS_ROLE_ARN, AWS_WEB_IDENTITY_TOKEN_FILE,
AWS_ROLE_SESSION_NAME and AWS_ENDPOINT_URL_STS, exactly as a function
runtime or a Kubernetes pod would set them; no Herald-specific code runs.
stdout: {"method", "access_key", "has_token"}
"""
import json

import boto3

session = boto3.Session(region_name="us-east-1")
creds = session.get_credentials()
frozen = creds.get_frozen_credentials()
print(json.dumps({
    "method": creds.method,
    "access_key": frozen.access_key,
    "has_token": bool(frozen.token),
}))
