//! The agent's Workload API request path: the bytes a client writes on
//! the Unix socket (through the HTTP/2 `:authority` rewriter), the
//! protobuf requests tonic decodes from them, and what the agent does with
//! a request's content (`ValidateJWTSVID`'s token check).

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use herald_agent::workload::h2_authority::AuthorityRewriter;
use herald_agent::workload::jwt::{to_struct, validate};
use herald_proto::workload::{
    JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest, X509BundlesRequest, X509svidRequest,
};
use prost::Message;

use crate::jwt::{AUDIENCE, TRUST_DOMAIN, bundle_jwks};

/// The HTTP/2 client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the rewriter hands h2 for `input` read in pieces of `piece` bytes,
/// or the error that ends the connection.
fn rewrite(input: &[u8], piece: usize) -> std::io::Result<Vec<u8>> {
    let mut r = AuthorityRewriter::new();
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    for chunk in input.chunks(piece.max(1)) {
        r.feed(chunk)?;
        while r.has_output() {
            let n = r.take(&mut buf);
            out.extend_from_slice(&buf[..n]);
        }
    }
    Ok(out)
}

/// Decodes `bytes` as `M`; a message that decodes re-encodes canonically
/// (decode ∘ encode is the identity, encode is a fixed point).
fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(bytes: &[u8]) -> Option<M> {
    let m = M::decode(bytes).ok()?;
    let encoded = m.encode_to_vec();
    let again = M::decode(encoded.as_slice()).expect("an encoded message decodes");
    assert_eq!(again, m);
    assert_eq!(again.encode_to_vec(), encoded);
    crate::accept();
    Some(m)
}

/// Mode 0: `rest` is a connection's client bytes (the first byte the read
/// size); the rewriter's output must not depend on how reads split them,
/// and a connection that is not HTTP/2 passes through untouched. Mode 1:
/// `rest` is a Workload API request message (the first byte picks which);
/// it round-trips (and so does an Envoy SDS `DiscoveryRequest`, served on
/// the same socket), and a `ValidateJWTSVID` request's token never validates
/// (nothing here is signed by the bundle's key). Mode 2: `rest` is header
/// JSON `0xff` claims JSON of a JWT-SVID signed with the bundle's key.
pub fn workload_api(data: &[u8]) {
    let Some((mode, rest)) = crate::mode(data, 3) else {
        return;
    };
    match mode {
        0 => {
            let Some((&piece, input)) = rest.split_first() else {
                return;
            };
            let whole = rewrite(input, input.len());
            let pieces = rewrite(input, usize::from(piece));
            match (&whole, &pieces) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(a, b, "the output depends on read sizes");
                    crate::accept();
                }
                (Err(_), Err(_)) => {}
                _ => panic!("read sizes change the outcome: {whole:?} / {pieces:?}"),
            }
            if input.len() >= PREFACE.len() && !input.starts_with(PREFACE) {
                assert_eq!(
                    whole.ok().as_deref(),
                    Some(input),
                    "not HTTP/2: passed through"
                );
            }
        }
        1 => {
            let Some((&which, msg)) = rest.split_first() else {
                return;
            };
            match which % 6 {
                0 => drop(round_trip::<X509svidRequest>(msg)),
                1 => drop(round_trip::<X509BundlesRequest>(msg)),
                2 => drop(round_trip::<JwtBundlesRequest>(msg)),
                3 => drop(round_trip::<JwtsvidRequest>(msg)),
                // Envoy SDS on the same socket.
                4 => drop(round_trip::<DiscoveryRequest>(msg)),
                _ => {
                    if let Some(req) = round_trip::<ValidateJwtsvidRequest>(msg) {
                        assert!(
                            validate(&req.svid, &req.audience, bundle_jwks(), TRUST_DOMAIN)
                                .is_err(),
                            "an unsigned JWT-SVID validated"
                        );
                    }
                }
            }
        }
        _ => {
            let parts = crate::split(rest, 2);
            let token = crate::jwt::sign(parts[0], parts.get(1).copied().unwrap_or_default());
            let req = ValidateJwtsvidRequest {
                audience: AUDIENCE.into(),
                svid: token,
            };
            let req = round_trip::<ValidateJwtsvidRequest>(&req.encode_to_vec())
                .expect("a request decodes");
            if let Ok((id, claims)) =
                validate(&req.svid, &req.audience, bundle_jwks(), TRUST_DOMAIN)
            {
                let id = herald_core::SpiffeId::parse(&id).expect("sub is a SPIFFE ID");
                assert_eq!(id.trust_domain().as_str(), TRUST_DOMAIN);
                let n = claims.len();
                assert_eq!(to_struct(claims).fields.len(), n);
            }
        }
    }
}
