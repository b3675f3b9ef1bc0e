//! Valid inputs for every target, from which the fuzzers start (written to
//! `fuzz/corpus/<target>/` by `cargo run -p herald-fuzz --example
//! write-seeds`) and which the replay test runs as they are: a mutation of
//! a valid input reaches far deeper than random bytes.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::json;

/// A valid TPMS_ATTEST (quote) for the TPM fixture: the nonce binding,
/// PCRs 0, 1, 2 and 7 of the SHA-256 bank and their digest.
pub fn tpm_attest() -> Vec<u8> {
    let f = crate::tpm::fixture();
    let signer = f.ak.name().expect("the AK has a name");
    let mut a = Vec::new();
    a.extend_from_slice(&0xff54_4347u32.to_be_bytes());
    a.extend_from_slice(&0x8018u16.to_be_bytes());
    for v in [&signer[..], &f.extra_data[..]] {
        a.extend_from_slice(&(v.len() as u16).to_be_bytes());
        a.extend_from_slice(v);
    }
    a.extend_from_slice(&123_456u64.to_be_bytes()); // clock
    a.extend_from_slice(&3u32.to_be_bytes()); // resetCount
    a.extend_from_slice(&1u32.to_be_bytes()); // restartCount
    a.push(1); // safe
    a.extend_from_slice(&0x0001_0002_0003_0004u64.to_be_bytes());
    a.extend_from_slice(&f.selection.marshal().expect("a selection"));
    let mut digest = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for v in &f.pcrs {
        digest.update(v);
    }
    a.extend_from_slice(&32u16.to_be_bytes());
    a.extend_from_slice(digest.finish().as_ref());
    a
}

fn with_mode(mode: u8, rest: &[u8]) -> Vec<u8> {
    let mut v = vec![mode];
    v.extend_from_slice(rest);
    v
}

fn joined(mode: u8, a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut v = with_mode(mode, a);
    v.push(0xff);
    v.extend_from_slice(b);
    v
}

/// A CertificationRequestInfo for the fixture key, with `extensions`
/// (DER `Extension`s) requested.
fn csr_info(extensions: &[u8]) -> Vec<u8> {
    use crate::csr::der;
    let spki = {
        // SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING point }
        let alg = [
            0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
            0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
        ];
        let mut bits = vec![0u8];
        bits.extend_from_slice(crate::p256_point());
        let mut body = alg.to_vec();
        body.extend_from_slice(&der(0x03, &bits));
        der(0x30, &body)
    };
    let subject = der(
        0x30,
        &der(
            0x31,
            &der(
                0x30,
                &[&[0x06, 0x03, 0x55, 0x04, 0x03][..], &der(0x0c, b"fuzz")].concat(),
            ),
        ),
    );
    let attributes = if extensions.is_empty() {
        der(0xa0, &[])
    } else {
        // extensionRequest (1.2.840.113549.1.9.14)
        let oid = [
            0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x0e,
        ];
        let attr = der(
            0x30,
            &[&oid[..], &der(0x31, &der(0x30, extensions))].concat(),
        );
        der(0xa0, &attr)
    };
    der(
        0x30,
        &[&[0x02, 0x01, 0x00][..], &subject, &spki, &attributes].concat(),
    )
}

/// Every target's seeds, by target name.
pub fn all() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    use crate::csr::der;
    let attest = tpm_attest();
    let ak = crate::tpm::ak_public_bytes();
    let basic_ca = der(
        0x30,
        &[
            &[0x06, 0x03, 0x55, 0x1d, 0x13][..],
            &[0x01, 0x01, 0xff],
            &der(0x04, &der(0x30, &[0x01, 0x01, 0xff])),
        ]
        .concat(),
    );
    let san = der(
        0x30,
        &[
            &[0x06, 0x03, 0x55, 0x1d, 0x11][..],
            &der(0x04, &der(0x30, &der(0x86, b"spiffe://example.org/x"))),
        ]
        .concat(),
    );
    let header = json!({"alg": "ES256", "kid": crate::jwt::KID, "typ": "JWT"}).to_string();
    let oidc_claims = json!({
        "iss": crate::jwt::ISSUER, "sub": "repo:acme/webapp", "aud": crate::jwt::AUDIENCE,
        "exp": 2_000_000_000, "iat": 1_699_999_990, "nbf": 1_699_999_990, "jti": "abc",
        "ref": "refs/heads/main", "nested": {"k": [1, 2.5, true, null]},
    })
    .to_string();
    let svid_claims = json!({
        "sub": "spiffe://example.org/workload", "aud": [crate::jwt::AUDIENCE],
        "exp": 2_000_000_000, "iat": 1_699_999_990,
    })
    .to_string();
    let unsigned = format!(
        "{}.{}.c2ln",
        URL_SAFE_NO_PAD.encode(&header),
        URL_SAFE_NO_PAD.encode(&oidc_claims)
    );
    let examples = std::fs::read_dir(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../attestation-policies"),
    )
    .map(|d| {
        let mut files: Vec<_> = d
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        files.sort();
        files
            .iter()
            .filter_map(|p| std::fs::read(p).ok())
            .map(|t| with_mode(0, &t))
            .collect::<Vec<_>>()
    })
    .unwrap_or_default();
    let mut policy = examples;
    for cond in [
        r#"claims.ref == "refs/heads/main" && claims.protected"#,
        r#"claims.run_number > 10 && "a" in claims.labels"#,
        r#"claims.labels.exists(l, l.matches("^[a-c]$")) && size(claims.sub) < 100"#,
        r#"has(claims["kubernetes.io"].pod) && claims.sub.startsWith("repo:")"#,
    ] {
        policy.push(with_mode(1, cond.as_bytes()));
    }
    for expr in [
        r#""spiffe://dev.herald.test/ci/" + segment(claims.repository)"#,
        r#""spiffe://dev.herald.test/ci/" + segment(claims.repository_owner) + "/" + segment(string(claims.run_number))"#,
    ] {
        policy.push(with_mode(2, expr.as_bytes()));
    }
    let sigv4 = [
        &b"GET /bucket/key%20one?list-type=2&prefix=a%2Fb\nHost: s3.amazonaws.com\nx-amz-meta-a:  b   c\n\n"[..],
        b"POST /?Action=GetCallerIdentity&Version=2011-06-15\nhost: sts.amazonaws.com\ncontent-type: application/x-www-form-urlencoded\n\nAction=GetCallerIdentity",
        b"GET /a/./b/../c//d/?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=ASIA%2F20231114%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20231114T221320Z&X-Amz-Expires=60&X-Amz-SignedHeaders=host&X-Amz-Signature=00\nhost: x\n\n",
        b"PUT /k\nhost: x\nAuthorization: AWS4-HMAC-SHA256 Credential=ASIAX/20231114/us-east-1/s3/aws4_request, SignedHeaders=host;x-amz-date, Signature=abcd\nx-amz-date: 20231114T221320Z\nx-amz-security-token: AAAA\nx-amz-content-sha256: UNSIGNED-PAYLOAD\n\nbody",
    ];
    let forms = [
        with_mode(0, b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange&subject_token=eyJ.eyJ.sig&subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Ajwt&audience=a&resource=b&scope=x+y"),
        with_mode(0, b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange&subject_token=t&subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Aid_token&actor_token=jt&actor_token_type=urn%3Aherald%3Aparams%3Aoauth%3Atoken-type%3Ajoin-token&audience=a"),
        with_mode(1, b"Action=AssumeRoleWithWebIdentity&Version=2011-06-15&RoleArn=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Fdeploy&RoleSessionName=ci-run.1&WebIdentityToken=eyJ.eyJ.sig&DurationSeconds=3600&Policy=%7B%22Version%22%3A%222012-10-17%22%7D"),
        with_mode(1, b"Action=AssumeRole&Version=2011-06-15"),
    ];
    let h2 = {
        // The preface, an empty SETTINGS frame and a HEADERS frame whose
        // :authority is a socket path (literal, no indexing).
        let mut c = PREFACE_BYTES.to_vec();
        c.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
        for (index, value) in [
            (0x04u8, &b"/SpiffeWorkloadAPI/FetchX509SVID"[..]),
            (0x01, b"%2Frun%2Fherald%2Fagent.sock"),
        ] {
            block.extend_from_slice(&[index, value.len() as u8]);
            block.extend_from_slice(value);
        }
        let len = block.len() as u32;
        c.extend_from_slice(&len.to_be_bytes()[1..]);
        c.extend_from_slice(&[1, 4, 0, 0, 0, 1]);
        c.extend_from_slice(&block);
        c
    };
    use prost::Message;
    let jwt_req = herald_proto::workload::JwtsvidRequest {
        audience: vec!["a".into(), "b".into()],
        spiffe_id: "spiffe://example.org/w".into(),
    }
    .encode_to_vec();
    let validate_req = herald_proto::workload::ValidateJwtsvidRequest {
        audience: "a".into(),
        svid: unsigned.clone(),
    }
    .encode_to_vec();
    let sds_req = envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest {
        version_info: "1".into(),
        resource_names: vec!["default".into(), "ROOTCA".into()],
        type_url: "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret".into(),
        response_nonce: "n".into(),
        ..Default::default()
    }
    .encode_to_vec();
    vec![
        (
            "tpm",
            vec![
                with_mode(0, &ak),
                with_mode(1, &attest),
                with_mode(2, &crate::tpm::signature(&attest)),
            ],
        ),
        (
            "csr",
            vec![
                with_mode(0, &crate::csr::signed_csr(&csr_info(&[]))),
                with_mode(1, &csr_info(&san)),
                with_mode(1, &csr_info(&[basic_ca, san.clone()].concat())),
            ],
        ),
        (
            "jwt",
            vec![
                with_mode(0, unsigned.as_bytes()),
                joined(1, header.as_bytes(), oidc_claims.as_bytes()),
                joined(1, header.as_bytes(), svid_claims.as_bytes()),
            ],
        ),
        ("policy", policy),
        (
            "sigv4",
            sigv4
                .iter()
                .flat_map(|r| [with_mode(0, r), with_mode(1, r)])
                .collect(),
        ),
        ("exchange_form", forms.to_vec()),
        (
            "workload_api",
            vec![
                with_mode(0, &[&[7u8][..], &h2].concat()),
                with_mode(1, &[&[3u8][..], &jwt_req].concat()),
                with_mode(1, &[&[5u8][..], &validate_req].concat()),
                with_mode(1, &[&[4u8][..], &sds_req].concat()),
                joined(2, header.as_bytes(), svid_claims.as_bytes()),
            ],
        ),
    ]
}

const PREFACE_BYTES: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
